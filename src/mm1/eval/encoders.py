"""Scores of a pre-trained image encoder on the world's held-out scenes (the `val` and `support`
evaluation splits, which no training source holds): for CLIP (and SEED's final causal
embedding), zero-shot classification of the colour, shape and number of the shapes (class
embeddings from prompt ensembles) and image-text retrieval recall@1/5/10; for every encoder,
linear probes on the frozen patch features MM1 reads (their mean over patches; a tokenizer's
mean code vector), fit on part of the scenes and scored on the rest; for a tokenizer, what comes
back through its codes (VQ: pixels; SEED: causal and generation embeddings)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mm1.data.caption_pairs import caption_ids
from mm1.data.images import ImageProcessor
from mm1.data.scenes.scene import BACKGROUNDS, COLORS, SHAPES, count_word, plural
from mm1.data.tokenizer import Tokenizer
from mm1.eval.linear_probe import probe_accuracy
from mm1.models.clip import CLIPModel
from mm1.models.seed_tokenizer import SEEDModel, SEEDTokenizer
from mm1.models.vq import VQModel, VQTokenizer

SPLITS = ("val", "support")
RECALL_AT = (1, 5, 10)
PROBE_TRAIN_FRACTION = 0.7


@dataclass
class HeldOutScenes:
    paths: list[Path]
    scenes: list[dict[str, Any]]  # each image's scene: objects (color, shape, ...), background
    captions: list[list[str]]  # each image's reference captions


def held_out_scenes(world: str | Path) -> HeldOutScenes:
    root = Path(world)
    manifest = json.loads((root / "world.json").read_text())
    out = HeldOutScenes([], [], [])
    for split in SPLITS:
        info = manifest["eval"][split]
        coco = json.loads((root / info["coco_captions"]).read_text())
        caps: dict[int, list[str]] = {}
        for a in coco["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        for im in coco["images"]:
            out.paths.append(root / info["image_dir"] / im["file_name"])
            out.scenes.append(im["scene"])
            out.captions.append(caps.get(im["id"], []))
    return out


@dataclass
class ZeroShotTask:
    """Scenes `rows` with labels over `classes`; each class's prompts (an ensemble)."""

    name: str
    rows: list[int]
    labels: list[int]
    classes: list[str]
    prompts: list[list[str]]


def _single(scenes: Sequence[dict[str, Any]], attr: str) -> tuple[list[int], list[str]]:
    """Scenes whose objects all share one value of `attr`, and that value."""
    rows, values = [], []
    for i, s in enumerate(scenes):
        found = {o[attr] for o in s["objects"]}
        if len(found) == 1:
            rows.append(i)
            values.append(found.pop())
    return rows, values


def zero_shot_tasks(scenes: Sequence[dict[str, Any]]) -> list[ZeroShotTask]:
    colours, shapes = list(COLORS), list(SHAPES)
    rows, values = _single(scenes, "color")
    colour = ZeroShotTask(
        "colour",
        rows,
        [colours.index(v) for v in values],
        colours,
        [[f"a {c} {s}" for s in shapes] + [f"{c} shapes"] for c in colours],
    )
    rows, values = _single(scenes, "shape")
    shape = ZeroShotTask(
        "shape",
        rows,
        [shapes.index(v) for v in values],
        shapes,
        [[f"a {c} {s}" for c in colours] + [s] for s in shapes],
    )
    counts = sorted({s["count"] for s in scenes if s["count"] > 0})
    rows = [i for i, s in enumerate(scenes) if s["count"] > 0]

    def count_prompts(n: int) -> list[str]:
        shapes_n = plural(n, "shape")
        return [
            *(f"{count_word(n)} {shapes_n} on a {bg} background" for bg in BACKGROUNDS),
            *(f"{n} {shapes_n} on {bg}" for bg in BACKGROUNDS),
            f"pic of {n} {shapes_n}",
        ]

    count = ZeroShotTask(
        "count",
        rows,
        [counts.index(scenes[i]["count"]) for i in rows],
        [str(n) for n in counts],
        [count_prompts(n) for n in counts],
    )
    return [colour, shape, count]


# Linear-probe targets: a label per scene (None: the scene is left out of that probe).
PROBE_TARGETS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "count": lambda s: str(s["count"]),
    "background": lambda s: s["background"],
    "first_colour": lambda s: s["objects"][0]["color"] if s["objects"] else None,
    "first_shape": lambda s: s["objects"][0]["shape"] if s["objects"] else None,
}


_HOST = torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    """Where an encoder runs (`mm1 eval-encoder --device --dtype`): its batches go to `device`,
    floating ones in `dtype`; what comes back is on the CPU, floating in fp32, where every score
    is computed."""

    device: torch.device = _HOST
    dtype: torch.dtype = torch.float32

    @torch.no_grad()
    def batched(
        self, fn: Callable[..., torch.Tensor], n: int, batch: int, *arrays: torch.Tensor
    ) -> torch.Tensor:
        """`fn` over `batch`-sized slices of `arrays` (their first `n` rows), concatenated."""

        def there(a: torch.Tensor) -> torch.Tensor:
            return a.to(self.device, self.dtype if a.is_floating_point() else a.dtype)

        def back(t: torch.Tensor) -> torch.Tensor:
            return t.to("cpu", torch.float32 if t.is_floating_point() else t.dtype)

        slices = range(0, n, batch)
        return torch.cat([back(fn(*(there(a[i : i + batch]) for a in arrays))) for i in slices])


CPU = Placement()


def image_pixels(paths: Sequence[Path], processor: ImageProcessor) -> torch.Tensor:
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return processor(images)


def text_embeddings(
    model: CLIPModel,
    tok: Tokenizer,
    texts: Sequence[str],
    batch: int = 256,
    on: Placement = CPU,
) -> torch.Tensor:
    """L2-normalised joint-space embeddings of `texts`."""
    max_len = model.text.cfg.max_len
    rows = [caption_ids(tok, t, max_len) for t in texts]
    ids = torch.full((len(rows), max_len), tok.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])
    return F.normalize(on.batched(model.encode_text, len(rows), batch, ids, lengths), dim=-1)


def zero_shot_accuracy(
    model: CLIPModel,
    tok: Tokenizer,
    image_emb: torch.Tensor,
    task: ZeroShotTask,
    on: Placement = CPU,
) -> dict[str, float]:
    """Accuracy of the nearest class embedding (the normalised mean of its prompts'), with
    chance (1 / classes) and the majority class's share for comparison."""
    classes = torch.stack(
        [F.normalize(text_embeddings(model, tok, p, on=on).mean(0), dim=-1) for p in task.prompts]
    )
    pred = (image_emb[task.rows] @ classes.t()).argmax(1)
    labels = torch.tensor(task.labels)
    majority = max(task.labels.count(c) for c in set(task.labels)) / len(task.labels)
    return {
        "accuracy": float((pred == labels).float().mean()),
        "chance": 1 / len(task.classes),
        "majority": majority,
        "images": len(task.rows),
    }


def retrieval_recall(
    image_emb: torch.Tensor, caption_emb: torch.Tensor, owner: Sequence[int]
) -> dict[str, float]:
    """Recall@k both ways: image->text hits when any of the image's captions ranks in the top k;
    text->image when the caption's image does. Chance R@k is k / images for text->image."""
    sim = image_emb @ caption_emb.t()  # (images, captions)
    owner_t = torch.tensor(owner)
    out: dict[str, float] = {}
    for k in RECALL_AT:
        top_caps = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (images, k)
        hits = (owner_t[top_caps] == torch.arange(sim.shape[0])[:, None]).any(1)
        out[f"image_to_text_r{k}"] = float(hits.float().mean())
        top_imgs = sim.t().topk(min(k, sim.shape[0]), dim=1).indices  # (captions, k)
        out[f"text_to_image_r{k}"] = float((top_imgs == owner_t[:, None]).any(1).float().mean())
        out[f"text_to_image_r{k}_chance"] = min(1.0, k / sim.shape[0])
    return out


def linear_probes(
    features: torch.Tensor, scenes: Sequence[dict[str, Any]], seeds: Sequence[int]
) -> dict[str, dict[str, Any]]:
    """Per target: probe accuracy on the held-out 30% of the scenes, for each split seed, their
    mean and standard deviation, and the majority class's share."""
    out: dict[str, dict[str, Any]] = {}
    for name, label_of in PROBE_TARGETS.items():
        labelled = [(i, label_of(s)) for i, s in enumerate(scenes)]
        labelled = [(i, v) for i, v in labelled if v is not None]
        classes = sorted({v for _, v in labelled})
        rows = np.array([i for i, _ in labelled])
        y = torch.tensor([classes.index(v) for _, v in labelled])
        accs = []
        for seed in seeds:
            perm = np.random.default_rng([seed, 0x9B0BE]).permutation(len(rows))
            cut = int(PROBE_TRAIN_FRACTION * len(rows))
            tr, te = perm[:cut], perm[cut:]
            accs.append(
                probe_accuracy(features[rows[tr]], y[tr], features[rows[te]], y[te], len(classes))
            )
        counts = [int((y == c).sum()) for c in range(len(classes))]
        out[name] = {
            "accuracy": statistics.mean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "per_seed": accs,
            "majority": max(counts) / len(y),
            "classes": len(classes),
        }
    out["mean"] = {"accuracy": statistics.mean(v["accuracy"] for v in out.values())}
    return out


@torch.no_grad()
def evaluate_encoder(
    model: torch.nn.Module,
    tok: Tokenizer,
    processor: ImageProcessor,
    world: str | Path,
    probe_seeds: Sequence[int] = (0, 1, 2),
    batch: int = 128,
    on: Placement = CPU,
) -> dict[str, Any]:
    """Every score this module defines for `model` (a CLIPModel, AIMModel, VQModel or SEEDModel
    in eval mode, on `on`'s device in its dtype). A tokenizer's features are its codes' vectors
    (what the tokens carry), and what comes back through them is scored too."""
    held = held_out_scenes(world)
    pixels = image_pixels(held.paths, processor)
    tokenizer = isinstance(model, VQModel | SEEDModel)
    encode = (
        (lambda x: model.vision.code_vectors(model.vision.encode(x)).mean(1))
        if tokenizer
        else (lambda x: model.vision(x).mean(1))
    )
    features = on.batched(encode, len(pixels), batch, pixels)
    result: dict[str, Any] = {
        "images": len(held.paths),
        "linear_probe": linear_probes(features, held.scenes, probe_seeds),
    }
    if isinstance(model, VQModel):
        result["reconstruction"] = reconstruction_scores(model.vision, pixels, processor, batch, on)
    if isinstance(model, SEEDModel):
        result["seed"] = seed_scores(model.vision, pixels, batch, on)
    if isinstance(model, CLIPModel | SEEDModel):
        image_emb = on.batched(model.encode_image, len(pixels), batch, pixels)
        image_emb = F.normalize(image_emb, dim=-1)
        result["zero_shot"] = {
            t.name: zero_shot_accuracy(model, tok, image_emb, t, on)
            for t in zero_shot_tasks(held.scenes)
        }
        captions = [c for caps in held.captions for c in caps]
        owner = [i for i, caps in enumerate(held.captions) for _ in caps]
        result["retrieval"] = retrieval_recall(
            image_emb, text_embeddings(model, tok, captions, on=on), owner
        )
    return result


@torch.no_grad()
def reconstruction_scores(
    vq: VQTokenizer,
    pixels: torch.Tensor,
    processor: ImageProcessor,
    batch: int = 128,
    on: Placement = CPU,
) -> dict[str, Any]:
    """How well the images come back through their codes: the mean squared error in the
    processor's normalised space (the training loss's), PSNR on 0-255 pixels, and how much of
    the codebook the images use."""
    codes = on.batched(vq.encode, len(pixels), batch, pixels)
    recon = on.batched(vq.decode, len(codes), batch, codes)
    mse = float((recon - pixels).square().mean())
    err = (processor.unnormalize(recon) - processor.unnormalize(pixels)).square().mean()
    counts = torch.bincount(codes.flatten(), minlength=vq.cfg.codebook_size).float()
    p = counts[counts > 0] / counts.sum()
    return {
        "mse": mse,
        "psnr": float(10 * torch.log10(1.0 / err.clamp_min(1e-12))),
        "codes_used": int((counts > 0).sum()),
        "codebook_size": vq.cfg.codebook_size,
        "code_perplexity": float(torch.exp(-(p * p.log()).sum())),
    }


@torch.no_grad()
def seed_scores(
    tok: SEEDTokenizer, pixels: torch.Tensor, batch: int = 128, on: Placement = CPU
) -> dict[str, Any]:
    """What comes back through a SEED tokenizer's codes: the cosine of the decoded causal
    embeddings to the Q-Former's own, the cosine of the generation embedding to the image's
    CLIP embedding (its target), how often that generation embedding retrieves its own image's
    CLIP embedding first among all the images' (centred on their mean, as eval-generation
    scores), and how much of the codebook the images use."""

    def scores(x: torch.Tensor) -> torch.Tensor:
        features = tok.features(x)
        causal = tok.causal_embeddings(features)
        codes = tok.codes_of(tok.latents(causal))
        decoded = tok.decode_vectors(tok.code_vectors(codes))
        return torch.cat(
            [
                F.cosine_similarity(decoded, causal, dim=-1).mean(1, keepdim=True),
                tok.generation_embedding(decoded),
                tok.target_embedding(features),
                codes.float(),  # exact in fp32 (bf16 would round codes above 256)
            ],
            dim=1,
        )

    out = on.batched(scores, len(pixels), batch, pixels)
    e = tok.cfg.embed_dim
    generated, target = out[:, 1 : 1 + e], out[:, 1 + e : 1 + 2 * e]
    codes = out[:, 1 + 2 * e :].long()
    mean = target.mean(0)
    sim = F.normalize(generated - mean, dim=-1) @ F.normalize(target - mean, dim=-1).t()
    own = torch.arange(len(sim))
    return {
        "causal_cosine": float(out[:, 0].mean()),
        "generation_cosine": float(F.cosine_similarity(generated, target, dim=-1).mean()),
        "generation_r1": float((sim.argmax(1) == own).float().mean()),
        "generation_r1_chance": 1 / len(sim),
        **{k: v for k, v in tok.usage(codes).items()},
        "codebook_size": tok.codebook_size,
    }


def encoder_report(result: dict[str, Any], title: str) -> str:
    """The scores as markdown tables."""
    held = f"{result['images']} held-out scenes (world val + support)"
    where = result.get("runtime")
    ran = f"; the encoder ran on {where['device']} in {where['dtype']}" if where else ""
    lines = [f"# {title}", "", f"{held}{ran}.", ""]
    if "zero_shot" in result:
        lines += [
            "## Zero-shot classification",
            "",
            "| task | accuracy | chance | majority | images |",
        ]
        lines += ["|---|---|---|---|---|"]
        for name, r in result["zero_shot"].items():
            lines.append(
                f"| {name} | {r['accuracy']:.3f} | {r['chance']:.3f} | {r['majority']:.3f} | "
                f"{r['images']} |"
            )
        r = result["retrieval"]
        lines += ["", "## Retrieval", "", "| direction | R@1 | R@5 | R@10 |", "|---|---|---|---|"]
        for d in ("image_to_text", "text_to_image"):
            lines.append(
                f"| {d} | " + " | ".join(f"{r[f'{d}_r{k}']:.3f}" for k in RECALL_AT) + " |"
            )
        chance = " | ".join(f"{r[f'text_to_image_r{k}_chance']:.3f}" for k in RECALL_AT)
        lines.append(f"| text_to_image chance | {chance} |")
    if "reconstruction" in result:
        r = result["reconstruction"]
        lines += [
            "## Reconstruction (through the codes)",
            "",
            "| mse (normalised pixels) | PSNR (dB, 0-255 pixels) | codes used | code perplexity |",
            "|---|---|---|---|",
            f"| {r['mse']:.4f} | {r['psnr']:.2f} | {r['codes_used']} of {r['codebook_size']} | "
            f"{r['code_perplexity']:.1f} |",
        ]
    if "seed" in result:
        r = result["seed"]
        lines += [
            "",
            "## Through the codes (de-tokenized)",
            "",
            "| causal embeddings: cosine | generation embedding: cosine to CLIP's | its R@1 "
            "among the images (chance) | codes used | code perplexity |",
            "|---|---|---|---|---|",
            f"| {r['causal_cosine']:.3f} | {r['generation_cosine']:.3f} | "
            f"{r['generation_r1']:.3f} ({r['generation_r1_chance']:.3f}) | "
            f"{r['codes_used'] * r['codebook_size']:.0f} of {r['codebook_size']} | "
            f"{r['code_perplexity']:.1f} |",
        ]
    tokenizer = "reconstruction" in result or "seed" in result
    what = "mean code vectors" if tokenizer else "mean patch features"
    lines += ["", f"## Linear probe ({what})", ""]
    lines += [
        "| target | accuracy | std over splits | majority | classes |",
        "|---|---|---|---|---|",
    ]
    for name, r in result["linear_probe"].items():
        if name == "mean":
            continue
        lines.append(
            f"| {name} | {r['accuracy']:.3f} | {r['std']:.3f} | {r['majority']:.3f} | "
            f"{r['classes']} |"
        )
    lines.append(f"| mean | {result['linear_probe']['mean']['accuracy']:.3f} | | | |")
    return "\n".join(lines) + "\n"


def untrained_like(model: torch.nn.Module, cfg: Any, vocab_size: int, seed: int) -> torch.nn.Module:
    """A freshly initialised model of `model`'s architecture (the random-encoder baseline, in
    eval mode), keeping what `model` kept frozen and so never trained (a SEED tokenizer's CLIP
    towers)."""
    from mm1.models.encoders import build_encoder_model

    torch.manual_seed(seed)
    fresh = build_encoder_model(cfg, vocab_size).eval()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    fresh.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k in frozen}, strict=False
    )
    return fresh


def evaluate_encoder_run(
    run: str | Path,
    world: str | Path | None = None,
    out_dir: str | Path | None = None,
    untrained_seed: int | None = None,
    probe_seeds: Sequence[int] = (0, 1, 2),
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
) -> tuple[dict[str, Any], Path]:
    """Score an encoder run (or, with `untrained_seed`, a freshly initialised model of its
    architecture: the random-encoder baseline) on its world's held-out scenes, run on `device`
    in `dtype` (the scores computed on the CPU in fp32); writes
    `encoder_eval.json` and `encoder_eval.md` to `out_dir` (default RUN/eval; for a checkpoint
    RUN/eval/step_N: the checkpoint's own folder is deleted when it rotates out). Returns the
    scores and the directory."""
    from mm1.checkpoint import is_checkpoint, refuse_mm1_run
    from mm1.config import ConfigError
    from mm1.data.world import run_world, saved_tokenizer_dir
    from mm1.models.encoders import load_encoder_run
    from mm1.pretrained import check_runtime, dtype_name

    on = Placement(*check_runtime(device, dtype))
    if not probe_seeds:  # the probe's mean over no splits is undefined
        raise ConfigError("--probe-seeds must be >= 1 (linear-probe train/test splits)")
    refuse_mm1_run(run)  # else: "not a clip encoder run" and a state_dict error
    p = Path(run)
    default = p.parent.parent / "eval" / p.name if is_checkpoint(p) else p / "eval"
    out = Path(out_dir) if out_dir is not None else default
    # Before the model loads and every score is computed, not when the results are written.
    if out.exists() and not out.is_dir():
        where = "--out" if out_dir is not None else "the results directory"
        raise ConfigError(f"{where} {out}: is a file, not a directory; give a directory")
    cfg, model = load_encoder_run(run)
    tok_dir = saved_tokenizer_dir(Path(run))
    tok = Tokenizer.from_file(tok_dir)
    processor = ImageProcessor.from_pretrained(tok_dir)
    what = f"encoder run {run} ({cfg.encoder.objective})"
    if untrained_seed is not None:
        model = untrained_like(model, cfg, tok.vocab_size, untrained_seed)
        what = f"untrained {cfg.encoder.objective} encoder (seed {untrained_seed}) of {run}"
    world = Path(world or run_world(run))
    if not (world / "world.json").is_file():
        raise FileNotFoundError(f"{world}: no synthetic world (world.json) to evaluate on")
    model.to(on.device, on.dtype)
    scores = evaluate_encoder(model, tok, processor, world, probe_seeds, on=on)
    # which world was scored on: the default follows the run's config, so say where it led
    result = {"encoder": what, "world": str(world.resolve()), **scores}
    result["runtime"] = {"device": str(on.device), "dtype": dtype_name(on.dtype)}
    suffix = "" if untrained_seed is None else f"_untrained{untrained_seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"encoder_eval{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"encoder_eval{suffix}.md").write_text(encoder_report(result, what))
    return result, out
