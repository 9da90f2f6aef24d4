"""Text-to-image scores of a model that generates image features (`model.family: emu2`): each
held-out caption's generated features (`generate_image_features`, after the caption as training
writes it caption first) retrieve among the held-out images' encoded features. mm1 has no pixel
decoder (Emu2's is a diffusion model), so the features are scored where the regression put
them, in the encoder's pooled space: recall@k against chance, the cosine of the generated
features to their own image's against the other images', and the l1 error the talk trains on.
A model that ignores its caption generates the same features for every caption and retrieves
at chance. Cosines are taken on features centred on the scored images' mean."""

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
from mm1.models.emu2 import Emu2, generate_image_features
from mm1.pretrained import Pretrained

RESULTS = "image_generation.json"
EXAMPLES = 6  # captions shown in the plot, with their nearest images
NEAREST = 4


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


@torch.no_grad()
def evaluate_image_generation(
    p: Pretrained, images: CaptionedImages, batch: int = 32
) -> dict[str, Any]:
    """The scores of `p` (an emu2 model) on `images`: every caption generates features once."""
    model = p.model
    if not isinstance(model, Emu2):
        raise ConfigError(
            f"model.family={p.cfg.family} generates no image features (model.family=emu2 does)"
        )
    if len(images.paths) < 2:
        raise ConfigError(f"{len(images.paths)} captioned image(s): retrieval needs at least 2")
    model.eval()
    device = model.decoder.embed_tokens.weight.device
    pixels = image_pixels(images.paths, p.processor)
    encoded = torch.cat(
        [
            model.connector.pool(model.vision(pixels[i : i + batch].to(device))).float()
            for i in range(0, len(pixels), batch)
        ]
    )
    captions = [c for caps in images.captions for c in caps]
    owner = [i for i, caps in enumerate(images.captions) for _ in caps]
    prompts = [generation_prompt(p, c) for c in captions]
    pad = p.tokenizer.pad_id
    generated = torch.cat(
        [
            generate_image_features(model, prompts[i : i + batch], pad)
            for i in range(0, len(prompts), batch)
        ]
    )
    # Centred on the images' mean feature: the part every image shares would otherwise
    # dominate each cosine, and a model that generates only that part would look close.
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
    return {
        "images": len(images.paths),
        "captions": len(captions),
        "text_to_image": {k: v for k, v in recall.items() if k.startswith("text_to_image")},
        "cosine_own": float(own.mean()),
        "cosine_others": float(others.mean()),
        "l1": float((generated - encoded[torch.tensor(owner)]).abs().mean()),
        "examples": examples,
    }


def image_generation_report(result: dict[str, Any], title: str) -> str:
    """The scores as a markdown table."""
    r = result["text_to_image"]
    ks = sorted(int(k.removeprefix("text_to_image_r")) for k in r if k[-1].isdigit())
    return "\n".join(
        [
            f"# {title}",
            "",
            f"{result['captions']} captions of {result['images']} held-out images: each "
            "caption's generated features retrieve among the images' encoded ones.",
            "",
            "| | " + " | ".join(f"R@{k}" for k in ks) + " |",
            "|---|" + "---|" * len(ks),
            "| text -> image | " + " | ".join(f"{r[f'text_to_image_r{k}']:.3f}" for k in ks) + " |",
            "| chance | " + " | ".join(f"{r[f'text_to_image_r{k}_chance']:.3f}" for k in ks) + " |",
            "",
            f"Cosine of generated to encoded features (centred): own image {result['cosine_own']:.3f}, "
            f"other images {result['cosine_others']:.3f}; l1 error {result['l1']:.4f}.",
            "",
            "Examples: each caption's own image and its generated features' nearest images in "
            f"`{RESULTS.replace('.json', '.png')}`.",
            "",
        ]
    )


def plot_examples(result: dict[str, Any], out_png: Path) -> Path:
    """Each example caption beside its own image and the images its generated features are
    nearest to (framed green where that is its own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = result["examples"]
    cols = 1 + max(len(e["nearest"]) for e in examples)
    fig, axes = plt.subplots(
        len(examples), cols, figsize=(1.6 * cols, 1.9 * len(examples)), squeeze=False
    )
    for row, e in zip(axes, examples):
        for col, (ax, path) in enumerate(zip(row, [e["image"], *e["nearest"]])):
            with Image.open(path) as im:
                ax.imshow(im.convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            hit = col > 0 and path == e["image"]
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if hit else "0.8")
                spine.set_linewidth(3 if hit else 1)
            ax.set_title("its image" if col == 0 else f"nearest {col}", fontsize=7)
        row[0].set_ylabel(_wrapped(e["caption"]), fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle("Generated features: nearest held-out images (green: the caption's own)")
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
    (out / RESULTS).write_text(json.dumps(result, indent=1) + "\n")
    (out / RESULTS.replace(".json", ".md")).write_text(image_generation_report(result, title))
    if result.get("examples"):
        plot_examples(result, out / RESULTS.replace(".json", ".png"))
    return out / RESULTS


def scored_pairs(images: CaptionedImages, limit: int) -> CaptionedImages:
    """The first `limit` images (0: all)."""
    if limit <= 0:
        return images
    return CaptionedImages(images.paths[:limit], images.captions[:limit])
