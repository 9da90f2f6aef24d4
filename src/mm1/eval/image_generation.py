"""Text-to-image scores of a model that generates images: each held-out caption's generated
image (after the caption as training writes it caption first) retrieves among the held-out
images, in the space the model generates in.

- emu2 (`generate_image_features`): the encoder's pooled features, where the regression put
  them (mm1 has no pixel decoder; Emu2's is a diffusion model); its error is the l1 the talk
  trains on.
- chameleon (`generate_image_codes`, greedy): the VQ tokenizer's code vectors of the image's
  grid; its error is the share of codes that differ from the image's own, and the plot shows
  the generated images, decoded to pixels by the tokenizer.
- seed (`generate_image_codes`): the generated codes' generation embedding (the SEED tokenizer's
  de-tokenizer) against each image's CLIP embedding, which the tokenizer was trained to
  reproduce (SEED draws pixels from it with a diffusion model, which mm1 does not have); its
  error is again the share of codes that differ from the image's own.

Reported: recall@k against chance, and the cosine of each generated image to its own image
against the other images. A model that ignores its caption generates the same image for every
caption and retrieves at chance. Cosines are taken on representations centred on the scored
images' mean."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from mm1.config import ConfigError
from mm1.data.tokenizer import IMAGE_TOKEN, tokenize_prompt
from mm1.eval.encoders import held_out_scenes, image_pixels, retrieval_recall
from mm1.models.chameleon import Chameleon, generate_image_codes
from mm1.models.emu2 import Emu2, generate_image_features
from mm1.models.generation import Sampling, check_prompt_fits
from mm1.models.seed import SEED
from mm1.pretrained import Pretrained

RESULTS = "image_generation.json"
EXAMPLES = 6  # captions shown in the plot, with their nearest images
NEAREST = 4
GENERATED = "generated_pixels"  # the examples' generated images (chameleon), not in the JSON


@dataclass
class CaptionedImages:
    paths: list[Path]
    captions: list[list[str]]  # each image's captions


def world_captioned_images(world: str | Path) -> CaptionedImages:
    """The synthetic world's held-out scenes (val + support) with their reference captions."""
    held = held_out_scenes(world)
    return CaptionedImages(held.paths, held.captions)


def coco_captioned_images(captions: str | Path, image_dir: str | Path) -> CaptionedImages:
    """The images of a COCO captions file with all their captions."""
    from mm1.eval.tasks import load_coco_captions

    examples = load_coco_captions(captions, image_dir, "image generation")
    return CaptionedImages([e.image for e in examples], [list(e.references) for e in examples])


def generation_prompt(p: Pretrained, caption: str) -> list[int]:
    """`caption` as a caption-first pair is written in training, up to its image's first slot
    (BOS, the caption, and `<img>` when the model was trained with boundaries)."""
    blank = Image.new("RGB", (p.cfg.vision.image_size,) * 2)
    ids = tokenize_prompt(caption + IMAGE_TOKEN, [blank], p.tokenizer, p.prompt_format)
    return ids[: ids.index(p.tokenizer.image_id)]


def unconditional_prompt(p: Pretrained) -> list[int]:
    """What precedes an image with no caption before it (an image-first pair's start: BOS, and
    `<img>` with boundaries): the prompt classifier-free guidance pushes away from. A model
    with neither has nothing there, so no unconditional prediction of an image's first code
    was ever trained: a ConfigError."""
    prompt = generation_prompt(p, "")
    if not prompt:
        raise ConfigError(
            "--guidance-scale: this model writes nothing before an image with no caption (its "
            "tokenizer has no BOS and it was trained without image boundaries), so it has no "
            "unconditional prediction to guide against; use --guidance-scale 1"
        )
    return prompt


@torch.no_grad()
def generate_images(
    p: Pretrained,
    caption: str,
    n: int = 1,
    sampling: Sampling | None = None,
    seed: int = 0,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """(n, 3, H, W) images in [0, 1] that a chameleon model generates after `caption` (written
    as a caption-first pair is in training), its codes decoded to pixels by its tokenizer;
    greedy unless `sampling` says otherwise (then n draws, from `seed`), with classifier-free
    guidance when `guidance_scale` != 1 (`unconditional_prompt`)."""
    model = p.model
    if not isinstance(model, Chameleon) or isinstance(model, SEED):
        why = "it generates no images"
        if isinstance(model, Emu2 | SEED):
            what = "image features" if isinstance(model, Emu2) else "CLIP image embeddings"
            why = (
                f"{p.cfg.family} generates {what}, which mm1 has no pixel decoder for (mm1 "
                "eval-generation scores them)"
            )
        raise ConfigError(
            f"model.family={p.cfg.family}: {why}; model.family=chameleon draws pixels"
        )
    if n < 1:
        raise ConfigError(f"--n {n}: at least one image")
    model.eval()
    prompt = generation_prompt(p, caption)
    check_prompt_fits(len(prompt) + model.num_image_tokens - 1, model.cfg.decoder.max_seq_len)
    generator = torch.Generator(model.decoder.embed_tokens.weight.device).manual_seed(seed)
    codes = generate_image_codes(
        model,
        [prompt] * n,
        p.tokenizer.pad_id,
        sampling,
        generator,
        guidance_scale,
        unconditional_prompt(p) if guidance_scale != 1.0 else (),
    )
    return p.processor.unnormalize(model.vision.decode(codes)).cpu()


def _encoded_and_generated(
    p: Pretrained,
    pixels: torch.Tensor,
    prompts: list[list[int]],
    batch: int,
    sampling: Sampling,
    seed: int,
    guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The images' representations, the captions' generated ones (same space, fp32), and the
    family's own outputs (its error; chameleon: the generated codes)."""
    model, pad = p.model, p.tokenizer.pad_id
    device = model.decoder.embed_tokens.weight.device

    def batched(fn: Any, items: Any) -> torch.Tensor:
        return torch.cat([fn(items[i : i + batch]) for i in range(0, len(items), batch)])

    if isinstance(model, Chameleon):
        tok = model.vision
        image_codes = batched(lambda x: tok.encode(x.to(device)), pixels)
        generator = torch.Generator(device).manual_seed(seed)
        uncond = unconditional_prompt(p) if guidance_scale != 1.0 else ()
        codes = batched(
            lambda ps: generate_image_codes(
                model, ps, pad, sampling, generator, guidance_scale, uncond
            ),
            prompts,
        )
        extra = {"codes": codes, "own": image_codes}
        if isinstance(model, SEED):  # generation embeddings against the images' CLIP ones
            clip = batched(lambda x: tok.target_embedding(tok.features(x.to(device))), pixels)
            return clip.float(), batched(tok.decode, codes).float(), extra
        return tok.code_vectors(image_codes), tok.code_vectors(codes), extra
    encoded = batched(lambda x: model.connector.pool(model.vision(x.to(device))).float(), pixels)
    generated = batched(lambda ps: generate_image_features(model, ps, pad), prompts)
    return encoded, generated, {}


@torch.no_grad()
def evaluate_image_generation(
    p: Pretrained,
    images: CaptionedImages,
    batch: int = 32,
    sampling: Sampling | None = None,
    seed: int = 0,
    guidance_scale: float = 1.0,
) -> dict[str, Any]:
    """The scores of `p` (an emu2, chameleon or seed model) on `images`: every caption
    generates an image once (chameleon, seed: greedy, or drawn as `sampling` says from
    `seed`; guided when `guidance_scale` != 1)."""
    model = p.model
    sampling = sampling or Sampling()
    if not isinstance(model, (Emu2, Chameleon)):
        raise ConfigError(
            f"model.family={p.cfg.family} generates no images (model.family=emu2, chameleon and "
            "seed do)"
        )
    if (sampling.do_sample or guidance_scale != 1.0) and not isinstance(model, Chameleon):
        raise ConfigError(
            f"model.family={p.cfg.family}: sampling and guidance apply to chameleon's and seed's "
            "codes; emu2's features are regressed, one per step"
        )
    if len(images.paths) < 2:
        raise ConfigError(f"{len(images.paths)} captioned image(s): retrieval needs at least 2")
    model.eval()
    pixels = image_pixels(images.paths, p.processor)
    captions = [c for caps in images.captions for c in caps]
    owner = [i for i, caps in enumerate(images.captions) for _ in caps]
    prompts = [generation_prompt(p, c) for c in captions]
    encoded, generated, extra = _encoded_and_generated(
        p, pixels, prompts, batch, sampling, seed, guidance_scale
    )
    # scored on the CPU (the recall's indices are built there), whatever device generated them
    encoded, generated = encoded.cpu(), generated.cpu()
    extra = {k: v.cpu() for k, v in extra.items()}
    # Centred on the images' mean: the part every image shares would otherwise dominate each
    # cosine, and a model that generates only that part would look close.
    mean = encoded.mean(0)
    image_emb = F.normalize((encoded - mean).flatten(1), dim=-1)
    generated_emb = F.normalize((generated - mean).flatten(1), dim=-1)
    recall = retrieval_recall(image_emb, generated_emb, owner)
    sim = generated_emb @ image_emb.t()  # (captions, images)
    rows = torch.arange(len(owner))
    own = sim[rows, torch.tensor(owner)]
    others = (sim.sum(1) - own) / (sim.shape[1] - 1)
    nearest = sim.topk(min(NEAREST, sim.shape[1]), dim=1).indices.tolist()
    firsts = [owner.index(i) for i in sorted(set(owner))][:EXAMPLES]  # an image's first caption
    examples = [
        {
            "caption": captions[j],
            "image": str(images.paths[owner[j]]),
            "nearest": [str(images.paths[i]) for i in nearest[j]],
        }
        for j in firsts
    ]
    result: dict[str, Any] = {
        "images": len(images.paths),
        "captions": len(captions),
        "sampling": vars(sampling)
        | ({"seed": seed} if sampling.do_sample else {})
        | ({"guidance_scale": guidance_scale} if isinstance(model, Chameleon) else {}),
        "text_to_image": {k: v for k, v in recall.items() if k.startswith("text_to_image")},
        "cosine_own": float(own.mean()),
        "cosine_others": float(others.mean()),
        "examples": examples,
    }
    if "codes" in extra:
        same = extra["codes"] == extra["own"][torch.tensor(owner)]
        result["code_match"] = float(same.float().mean())
        result["distinct_generations"] = len({tuple(c) for c in extra["codes"].tolist()})
        if not isinstance(model, SEED):  # chameleon's codes decode to pixels
            device = model.decoder.embed_tokens.weight.device
            decoded = model.vision.decode(extra["codes"][torch.tensor(firsts)].to(device))
            result[GENERATED] = p.processor.unnormalize(decoded).cpu()
    else:
        result["l1"] = float((generated - encoded[torch.tensor(owner)]).abs().mean())
    return result


def image_generation_report(result: dict[str, Any], title: str) -> str:
    """The scores as a markdown table."""
    r = result["text_to_image"]
    ks = sorted(int(k.removeprefix("text_to_image_r")) for k in r if k[-1].isdigit())
    return "\n".join(
        [
            f"# {title}",
            "",
            f"{result['captions']} captions of {result['images']} held-out images: each "
            "caption's generated image retrieves among the images (in the space it is "
            "generated in: emu2's pooled features, chameleon's code vectors, seed's generation "
            "embeddings against the images' CLIP embeddings); "
            f"{_how(result.get('sampling', {}))}.",
            "",
            "| | " + " | ".join(f"R@{k}" for k in ks) + " |",
            "|---|" + "---|" * len(ks),
            "| text -> image | " + " | ".join(f"{r[f'text_to_image_r{k}']:.3f}" for k in ks) + " |",
            "| chance | " + " | ".join(f"{r[f'text_to_image_r{k}_chance']:.3f}" for k in ks) + " |",
            "",
            f"Cosine of generated to encoded images (centred): own image {result['cosine_own']:.3f}, "
            f"other images {result['cosine_others']:.3f}; {_error(result)}.",
            "",
            "Examples: each caption's own image"
            + (", its generated image" if GENERATED in result else "")
            + f" and the nearest images in `{RESULTS.replace('.json', '.png')}`.",
            "",
        ]
    )


def _how(sampling: dict[str, Any]) -> str:
    scale = sampling.get("guidance_scale", 1.0)
    guided = f", classifier-free guidance {scale:g}" if scale != 1.0 else ""
    if not sampling.get("do_sample"):
        return "greedy" + guided
    top_k = f", top-k {sampling['top_k']}" if sampling.get("top_k") else ""
    how = f"sampled at temperature {sampling['temperature']:g}{top_k}"
    return f"{how}{guided}, seed {sampling['seed']}"


def _error(result: dict[str, Any]) -> str:
    if "code_match" in result:
        return (
            f"{100 * result['code_match']:.1f}% of generated codes are the image's own; "
            f"{result['distinct_generations']} distinct images from {result['captions']} captions"
        )
    return f"l1 error {result['l1']:.4f}"


def plot_examples(result: dict[str, Any], out_png: Path) -> Path:
    """Each example caption beside its own image and the images its generated features are
    nearest to (framed green where that is its own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = result["examples"]
    generated = result.get(GENERATED)  # chameleon: the decoded images, one per example
    lead = 1 + (generated is not None)
    cols = lead + max(len(e["nearest"]) for e in examples)
    fig, axes = plt.subplots(
        len(examples), cols, figsize=(1.6 * cols, 1.9 * len(examples)), squeeze=False
    )
    for i, (row, e) in enumerate(zip(axes, examples)):
        shown = [e["image"], *([None] if generated is not None else []), *e["nearest"]]
        for col, (ax, path) in enumerate(zip(row, shown)):
            if path is None:
                ax.imshow(generated[i].permute(1, 2, 0).numpy())
            else:
                with Image.open(path) as im:
                    ax.imshow(im.convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            hit = col >= lead and path == e["image"]
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if hit else "0.8")
                spine.set_linewidth(3 if hit else 1)
            title = ("its image", "generated")[col] if col < lead else f"nearest {col - lead + 1}"
            ax.set_title(title, fontsize=7)
        row[0].set_ylabel(_wrapped(e["caption"]), fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle("Generated images: nearest held-out images (green: the caption's own)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _wrapped(text: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:4])


def write_results(result: dict[str, Any], out: Path, title: str) -> Path:
    """`image_generation.json`, its markdown table and the examples' plot, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    saved = {k: v for k, v in result.items() if k != GENERATED}
    (out / RESULTS).write_text(json.dumps(saved, indent=1) + "\n")
    (out / RESULTS.replace(".json", ".md")).write_text(image_generation_report(result, title))
    if result.get("examples"):
        plot_examples(result, out / RESULTS.replace(".json", ".png"))
    return out / RESULTS


def scored_pairs(images: CaptionedImages, limit: int) -> CaptionedImages:
    """The first `limit` images (0: all)."""
    if limit <= 0:
        return images
    return CaptionedImages(images.paths[:limit], images.captions[:limit])
