"""Training step: mm1 (packed) against transformers' LLaVA (padded) on the same documents.

One fixed stream of real-length documents is drawn from the synthetic world's 45/45/10 mixture
(the default world, 64-px images) and tokenized once, 64 image tokens per image (one per 8x8
patch; LLaVA's "default" feature strategy drops the CLS token, as mm1's encoder does).

- mm1 packed: the loader's `Packer` packs the stream into rows of `seq_len` tokens (document
  ids, positions restarting per document, attention kept inside each document), `rows` rows
  per step.
- LLaVA plain: the same documents, split at `seq_len` exactly like the packer splits them (so
  nothing is truncated), `batch` samples per step in stream order, right-padded to the longest
  of the batch with `attention_mask` and labels -100 on padding, as LLaVA's collator does.
- LLaVA grouped: the same samples in the order of transformers' `LengthGroupedSampler`
  (random mega-batches of up to 50 batches, each sorted by length), what LLaVA's
  `group_by_modality_length` does within one modality.

LLaVA runs `llava_batch` samples per step (default 16, LLaVA-1.5's per-device batch in its
length-grouped fine-tuning); mm1 runs as many `seq_len` rows per step as hold the same real
tokens on average. A step is
forward, backward and AdamW, fp32, SDPA attention in both models. Effective tokens are the
non-padding tokens (text and image slots): the same total for every variant by construction,
so the throughput ratio is a time ratio over the same work.

Throughput: every variant's full pass over the stream is estimated from a stratified sample of
its steps (`strata`: steps sorted by size, one timed per stratum, weighted by the stratum's
size), so the stream can be long enough for realistic length grouping while few steps are run.
All variants run in one process, interleaved over `rounds`, each step keeping its best time.
Peak memory: each variant in a fresh subprocess running its 3 largest steps; peak RSS read as
`VmHWM` (see `common.peak_rss_mib`: Linux's `ru_maxrss` is inherited from the parent through
fork + exec). Every child imports the same modules (torch, transformers' LLaVA, mm1), so import
overhead is the same for all. Before timing, the LLaVA network loaded with mm1's weights
(through mm1's own HF exporters) must give mm1's logits on a few samples.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    RESULTS,
    Timer,
    emit,
    ensure_world,
    peak_rss_mib,
    print_table,
    ratio,
    run_child,
    set_threads,
    write_result,
)

IGNORE = -100
VARIANTS = ("mm1_packed", "llava_plain", "llava_grouped")


# ---------------------------------------------------------------------------------------------
# The document stream and the batches of each variant (parent process)
# ---------------------------------------------------------------------------------------------


def document_stream(world, tok, num_image_tokens: int, num_docs: int, seed: int = 0) -> list:
    """The first `num_docs` tokenized documents of the world's training mixture (slot 0)."""
    from mm1.data.mixture import Mixture, SourceStream
    from mm1.data.prompt_format import PromptFormat
    from mm1.data.tokenizer import tokenize_document
    from mm1.data.world import world_sources

    train, _ = world_sources(world)
    streams = [SourceStream(i, spec, 0, 1, seed) for i, spec in enumerate(train)]
    mixture = Mixture(streams, seed, 0)
    docs = []
    while len(docs) < num_docs:
        _, record = mixture.next()
        doc = tokenize_document(record, tok, PromptFormat(num_image_tokens))
        if len(doc.input_ids) >= 2:
            docs.append(doc)
    return docs


class Pixels:
    """Preprocessed pixels of each image object, computed once and shared by all variants."""

    def __init__(self, image_size: int) -> None:
        from mm1.data.images import ImageProcessor

        self.processor = ImageProcessor.clip(image_size)
        self.cache: dict[int, torch.Tensor] = {}

    def __call__(self, images: list) -> torch.Tensor | None:
        if not images:
            return None
        out = []
        for im in images:
            if id(im) not in self.cache:
                self.cache[id(im)] = self.processor([im])[0]
            out.append(self.cache[id(im)])
        return torch.stack(out)


def packed_batches(docs, seq_len: int, rows: int, pad_id: int) -> tuple[list[dict], float]:
    """mm1's packing of the stream, as the loader does it: fill the buffer, emit a sequence;
    at the end drain the buffer so every token of every document is emitted."""
    from mm1.data.packing import Packer, collate

    packer = Packer(seq_len, max_images=16)
    sequences = []
    for k, doc in enumerate(docs):
        if not packer.wants_more():
            sequences.append(packer.next_sequence())
        # A full (source, shard, record) ref: `Packer.add(doc)` with the default ref=() makes
        # pieces whose ref `_cut_filler` cannot unpack (see docs/benchmarks.md).
        packer.add(doc, (0, 0, k))
    while packer.buffer:
        sequences.append(packer.next_sequence())
    batches = []
    for i in range(0, len(sequences), rows):
        group = sequences[i : i + rows]
        images = [im for seq in group for p in seq for im in p.doc.images]
        b = collate(group, seq_len, pad_id)
        batches.append(
            {
                "input_ids": b.input_ids,
                "labels": b.labels,
                "position_ids": b.position_ids,
                "document_ids": b.document_ids,
                "images": images,
                "tokens": sum(len(p) for seq in group for p in seq),
            }
        )
    return batches, packer.stats.efficiency


def samples(docs, seq_len: int) -> list:
    """LLaVA's samples: each document, split at `seq_len` like the packer splits it."""
    from mm1.data.packing import split_document

    out = []
    for doc in docs:
        out += split_document(doc, seq_len, 16)[0]
    return out


def padded_batch(group: list, pad_id: int) -> dict:
    """LLaVA's collator: right padding to the longest, attention_mask, labels = input ids on
    target tokens (the model shifts them), -100 elsewhere."""
    longest = max(len(s.input_ids) for s in group)
    ids = torch.full((len(group), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(group), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(group), longest), dtype=torch.long)
    for r, s in enumerate(group):
        n = len(s.input_ids)
        ids[r, :n] = torch.tensor(s.input_ids)
        labels[r, :n] = torch.where(
            torch.tensor(s.target_mask), torch.tensor(s.input_ids), torch.tensor(IGNORE)
        )
        mask[r, :n] = 1
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "images": [im for s in group for im in s.images],
        "tokens": int(mask.sum()),
    }


def llava_batches(items: list, batch: int, pad_id: int, grouped: bool, seed: int = 0) -> list:
    order = list(range(len(items)))
    if grouped:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        g = torch.Generator().manual_seed(seed)
        lengths = [len(s.input_ids) for s in items]
        order = list(LengthGroupedSampler(batch, lengths=lengths, generator=g))
    out = []
    for i in range(0, len(order), batch):
        out.append(padded_batch([items[j] for j in order[i : i + batch]], pad_id))
    return out


def efficiency(batches: list[dict]) -> float:
    real = sum(b["tokens"] for b in batches)
    total = sum(b["input_ids"].numel() for b in batches)
    return real / total


def cost_key(b: dict) -> int:
    """Orders batches by their work: padded decoder tokens plus image-token work."""
    return b["input_ids"].numel() + 64 * len(b["images"])


def strata(batches: list[dict], k: int) -> list[tuple[int, int]]:
    """Stratified sample: sort by `cost_key`, cut into k equal strata, take each stratum's
    middle batch. Returns (batch index, stratum size); sum(size x time) estimates a full pass."""
    order = sorted(range(len(batches)), key=lambda i: cost_key(batches[i]))
    k = min(k, len(order))
    out = []
    for j in range(k):
        part = order[j * len(order) // k : (j + 1) * len(order) // k]
        out.append((part[len(part) // 2], len(part)))
    return out


def timed_batch(b: dict, pixels: Pixels) -> dict:
    """The model inputs of a batch (pixels preprocessed), plus its real-token count."""
    out = {k: v for k, v in b.items() if k != "images"}
    out["pixel_values"] = pixels(b["images"])
    return out


# ---------------------------------------------------------------------------------------------
# Child: one variant in a fresh process
# ---------------------------------------------------------------------------------------------


def _imports():
    """Every child imports the same modules, so import memory is the same for all variants."""
    import transformers  # noqa: F401
    from transformers import LlavaForConditionalGeneration  # noqa: F401

    import mm1.models.mllm  # noqa: F401
    from benchmarks.models import quiet_transformers

    quiet_transformers()


def make_step(variant: str, model, opt):
    """One training step (forward, backward, AdamW) on a batch dict; returns the loss."""

    def step(b: dict) -> float:
        kw = {k: v for k, v in b.items() if k != "tokens"}
        if variant != "mm1_packed":
            kw["use_cache"] = False
        loss = model(**kw).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def child(variant: str, data_file: str) -> dict[str, Any]:
    """Peak memory of one variant in a fresh process: the steps on its largest batches."""
    _imports()
    from benchmarks.models import build_llava, build_mm1

    set_threads()
    payload = torch.load(data_file, weights_only=False)
    cfg, batches = payload["cfg"], payload["batches"]
    model = build_mm1(cfg) if variant == "mm1_packed" else build_llava(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    rss_built = peak_rss_mib()
    step = make_step(variant, model, opt)
    for b in batches:
        step(b)
    return {
        "variant": variant,
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_build_mib": rss_built,
        "train_rss_mib": peak_rss_mib() - rss_built,
    }


def throughput(
    cfg,
    data: dict[str, list[dict]],
    pixels: Pixels,
    samples_per_variant: int,
    rounds: int,
    compile: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Effective tokens/s of every variant over its whole batch list, estimated from a
    stratified sample of its steps (`strata`), all variants in one process: round r times each
    sampled step of each variant in turn, and each step keeps its best time over the rounds, so
    a burst of load from other processes hits all variants alike and is then mostly dropped.
    With `compile`, every model's blocks are compiled and every timed shape is warmed up first,
    so no compilation is timed."""
    from benchmarks.models import build_llava, build_mm1, compile_blocks

    steps, chosen = {}, {}
    for name, batches in data.items():
        model = build_mm1(cfg) if name == "mm1_packed" else build_llava(cfg)
        model.train()
        if compile:
            compile_blocks(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        steps[name] = make_step(name, model, opt)
        chosen[name] = [
            (timed_batch(batches[i], pixels), n) for i, n in strata(batches, samples_per_variant)
        ]
        warm = chosen[name] if compile else chosen[name][len(chosen[name]) // 2 :][:1]
        for b, _ in warm:
            steps[name](b)
    best = {name: [float("inf")] * len(chosen[name]) for name in data}
    for _ in range(rounds):
        for name in data:
            for j, (b, _) in enumerate(chosen[name]):
                with Timer() as t:
                    steps[name](b)
                best[name][j] = min(best[name][j], t.seconds)
    out = {}
    for name, batches in data.items():
        tokens = sum(b["tokens"] for b in batches)
        padded = sum(b["input_ids"].numel() for b in batches)
        seconds = sum(n * t for (_, n), t in zip(chosen[name], best[name]))
        out[name] = {
            "variant": name,
            "steps": len(batches),
            "timed_steps": len(chosen[name]),
            "tokens": tokens,
            "padded_tokens": padded,
            "pad_efficiency": tokens / padded,
            "estimated_pass_seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "padded_tokens_per_s": padded / seconds,
            "timed_step_seconds": best[name],
            "timed_step_shapes": [list(b["input_ids"].shape) for b, _ in chosen[name]],
        }
    return out, steps


def profile_steps(steps: dict, data: dict[str, list[dict]], pixels: Pixels) -> None:
    """torch.profiler tables (top ops by self CPU time) of 3 median steps of each variant."""
    from torch.profiler import ProfilerActivity, profile

    for name, batches in data.items():
        picks = [timed_batch(batches[i], pixels) for i, _ in strata(batches, 5)[1:4]]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in picks:
                steps[name](b)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
        path = RESULTS / f"profile_train_{name}.txt"
        path.write_text(table + "\n")
        print(f"profile of 3 {name} steps: {path}")


def check_equivalence(cfg, docs, pixels: Pixels) -> float:
    """Max |logit difference| of mm1 and LLaVA-with-mm1's-weights on a few documents."""
    from benchmarks.models import build_mm1, llava_from_mm1, quiet_transformers

    quiet_transformers()
    model = build_mm1(cfg).eval()
    llava = llava_from_mm1(model).eval()
    worst = 0.0
    with torch.no_grad():
        for doc in [s for s in docs if s.images][:3] + [s for s in docs if not s.images][:1]:
            ids = torch.tensor([doc.input_ids])
            px = pixels(doc.images)
            a = model(ids, pixel_values=px).logits
            b = llava(input_ids=ids, pixel_values=px).logits
            worst = max(worst, float((a - b).abs().max()))
    return worst


def run(
    num_docs: int = 800,
    seq_len: int = 1024,
    llava_batch: int = 16,
    samples_per_variant: int = 6,
    rounds: int = 2,
    profile: bool = False,
    memory: bool = True,
    text_scale: float = 1.0,
    tag: str = "",
    compile: bool = False,
) -> dict[str, Any]:
    from benchmarks.models import build_mm1, num_params, small_config
    from mm1.data.tokenizer import Tokenizer

    threads = set_threads()
    world = ensure_world(64, text_scale=text_scale)
    tok = Tokenizer.from_file(world.tokenizer_path)
    cfg = small_config(tok.vocab_size, tok.image_id, image_size=64, max_seq_len=seq_len)
    q = cfg.num_image_tokens
    docs = document_stream(world, tok, q, num_docs)
    pixels = Pixels(cfg.vision.image_size)
    items = samples(docs, seq_len)
    tokens = sum(len(s.input_ids) for s in items)
    batch = llava_batch
    rows = max(1, round(batch * tokens / len(items) / seq_len))  # same real tokens per step
    mm1_batches, pack_eff = packed_batches(docs, seq_len, rows, tok.pad_id)
    data = {
        "mm1_packed": mm1_batches,
        "llava_plain": llava_batches(items, batch, tok.pad_id, grouped=False),
        "llava_grouped": llava_batches(items, batch, tok.pad_id, grouped=True),
    }
    max_diff = check_equivalence(cfg, items, pixels)
    if max_diff > 1e-3:
        raise RuntimeError(f"LLaVA and mm1 disagree (max logit difference {max_diff})")

    results, steps = throughput(cfg, data, pixels, samples_per_variant, rounds, compile)
    if profile:
        profile_steps(steps, data, pixels)
    del steps
    if memory:
        with tempfile.TemporaryDirectory() as tmp:
            for name, batches in data.items():
                # Peak memory is set by the largest steps: the 3 of highest `cost_key`.
                big = sorted(batches, key=cost_key)[-3:][::-1]
                f = Path(tmp) / f"{name}.pt"
                torch.save({"cfg": cfg, "batches": [timed_batch(b, pixels) for b in big]}, f)
                mem = run_child("benchmarks.train_step", ["--child", name, "--data", str(f)])
                results[name].update({k: v for k, v in mem.items() if k != "variant"})

    llava_names = [n for n in results if n.startswith("llava")]
    best = max(llava_names, key=lambda n: results[n]["tokens_per_s"])
    m, b = results["mm1_packed"], results[best]
    summary: dict[str, Any] = {
        "best_llava_variant": best,
        "tokens_per_s_ratio": ratio(m["tokens_per_s"], b["tokens_per_s"]),
        "target_tokens_per_s_ratio": 1.3,
    }
    for n in llava_names:
        summary[f"tokens_per_s_ratio_vs_{n}"] = ratio(m["tokens_per_s"], results[n]["tokens_per_s"])
    if memory:
        summary["peak_rss_ratio"] = ratio(m["peak_rss_mib"], b["peak_rss_mib"])
        summary["train_rss_ratio"] = ratio(m["train_rss_mib"], b["train_rss_mib"])
        summary["target_peak_memory_ratio"] = 1.0
    summary["tokens_per_s_target_met"] = summary["tokens_per_s_ratio"] >= 1.3
    if memory:
        summary["memory_target_met"] = summary["peak_rss_ratio"] <= 1.0
    out = {
        "settings": {
            "world": f"tiny, 64-px images, text_scale={text_scale:g}",
            "documents": len(docs),
            "llava_samples": len(items),
            "real_tokens": tokens,
            "seq_len": seq_len,
            "mm1_rows_per_step": rows,
            "llava_samples_per_step": batch,
            "image_tokens_per_image": q,
            "images": sum(len(d.images) for d in docs),
            "timed_steps_per_variant": samples_per_variant,
            "rounds": rounds,
            "torch_threads": threads,
            "params_mm1": num_params(build_mm1(cfg)),
            "max_logit_difference_llava_vs_mm1": max_diff,
            "packer_efficiency": pack_eff,
            "model": "CLIP ViT 64px/8 128x3 -> MLP(2) 64 tokens -> Llama 256x4 (fp32)",
            "attention": cfg.decoder.attention,
            "compile": compile,
        },
        "variants": results,
        "summary": summary,
    }
    name = "train_step" + ("" if text_scale == 1.0 else f"_text{text_scale:g}")
    name += f"_{tag}" if tag else ""
    path = write_result(name, out)
    cols = ["variant", "steps", "non-pad", "tokens/s", "vs best LLaVA"]
    if memory:
        cols += ["peak RSS MiB", "train MiB"]
    table = []
    for n, r in results.items():
        row = [n, r["steps"], r["pad_efficiency"], r["tokens_per_s"]]
        row.append(ratio(r["tokens_per_s"], b["tokens_per_s"]))
        if memory:
            row += [r["peak_rss_mib"], r["train_rss_mib"]]
        table.append(row)
    print_table(
        f"Training step: mm1 packed vs LLaVA padded ({tokens:,} real tokens, seq_len {seq_len})",
        cols,
        table,
    )
    print(f"wrote {path}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--docs", type=int, default=800)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument(
        "--llava-batch", type=int, default=16, help="LLaVA samples per step (mm1 rows match)"
    )
    ap.add_argument("--samples", type=int, default=6, help="timed steps per variant")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="profile 3 steps of each variant")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument(
        "--text-scale", type=float, default=1.0, help="world text: 1 web-like (default), 0 compact"
    )
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every block of both models (implies --no-memory; tag 'compile')",
    )
    args = ap.parse_args()
    if args.child:
        emit(child(args.child, args.data))
    else:
        run(
            args.docs,
            args.seq_len,
            args.llava_batch,
            args.samples,
            args.rounds,
            args.profile,
            not (args.no_memory or args.compile),
            args.text_scale,
            args.tag or ("compile" if args.compile else ""),
            args.compile,
        )


if __name__ == "__main__":
    main()
