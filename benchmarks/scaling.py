"""Scaling: mm1 training-step time and memory against sequence length and images per sequence.

The small benchmark model (ViT 64 px / 8, 128 x 3; MLP connector, 64 tokens per image; Llama
decoder 256 x 4, fp32, the default `attention: auto`) on synthetic packed rows
(`benchmarks.synthetic_batch`). Three sweeps, each in a fresh subprocess run in increasing order
(so the process's peak RSS after a point is that point's peak):

- sequence length 1k, 2k, 4k, 8k tokens, one image per 1024 tokens (constant image density,
  so per-token work is flat except for attention), in packed 512-token documents and as one
  document as long as the row (where attention cost takes over);
- images per 2048-token sequence: 1, 2, 4, 8, 16.

Each point: one warm-up step (counting the bytes autograd saves for backward), then one timed
step (forward, backward, AdamW). The decoder's attention share of FLOPs is the MFU formula's
12 L d T against 6 N (`summarize`).

The decoder runs `attention: auto` (the default): the dense document mask below 1,024 tokens,
length-grouped documents from 1,024 on.

Then an attention-only comparison at the same lengths (4 heads of 64, fwd + bwd): mm1's
additive document mask through SDPA (`attention: sdpa`), mm1's length-grouped causal SDPA
(`attention: varlen`, what `auto` runs from 1,024 tokens), and plain causal SDPA over the whole
row (no document boundaries: not a valid packing, only the cost reference).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.common import (
    Timer,
    emit,
    peak_rss_mib,
    print_table,
    ratio,
    run_child,
    set_threads,
    write_result,
)

VOCAB, IMAGE_ID = 1000, 3
SEQ_POINTS = (1024, 2048, 4096, 8192)
IMAGE_POINTS = (1, 2, 4, 8, 16)
SWEEPS = ("seq", "seq_doc", "images")


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def child(sweep: str) -> dict[str, Any]:
    from benchmarks.models import build_mm1, small_config
    from benchmarks.synthetic_batch import packed_batch

    set_threads()
    cfg = small_config(VOCAB, IMAGE_ID, image_size=64, max_seq_len=max(SEQ_POINTS))
    model = build_mm1(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    q = cfg.num_image_tokens
    if sweep == "images":
        points = [(2048, n, 512) for n in IMAGE_POINTS]
    else:  # packed 512-token documents, or one document as long as the row
        points = [(t, max(1, t // 1024), 512 if sweep == "seq" else t) for t in SEQ_POINTS]
    out = []
    for seq_len, images, doc_len in points:
        b = packed_batch(1, seq_len, images, q, 64, VOCAB, IMAGE_ID, doc_len=doc_len)
        result: dict[str, Any] = {}

        def step(b=b, result=result) -> None:
            loss = model(**b).loss
            result["loss"] = float(loss.detach())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with Timer() as warm:
            activations = saved_bytes(step)
        # Best of two timed steps where a step is short, one where it is long.
        best = float("inf")
        for _ in range(2 if warm.seconds < 3 else 1):
            with Timer() as t:
                step()
            best = min(best, t.seconds)
        out.append(
            {
                "seq_len": seq_len,
                "doc_len": doc_len,
                "images": images,
                "step_seconds": best,
                "ms_per_1k_tokens": 1000 * best / seq_len * 1000,
                "saved_activation_mib": activations / 2**20,
                "peak_rss_mib": peak_rss_mib(),
            }
        )
    return {"sweep": sweep, "points": out}


def attention_only(lengths=SEQ_POINTS, heads: int = 4, head_dim: int = 64, reps: int = 2):
    from mm1.models.decoder import additive_mask, attention_mask, document_groups, grouped_attention

    F = torch.nn.functional
    rows = []
    for t in lengths:
        g = torch.Generator().manual_seed(0)
        q, k, v = (
            torch.randn(1, heads, t, head_dim, generator=g).requires_grad_() for _ in range(3)
        )
        doc = torch.arange(t)[None] // 512
        mask = additive_mask(attention_mask(doc, doc), q)

        def dense_mask(q=q, k=k, v=v, mask=mask):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

        def grouped(q=q, k=k, v=v, doc=doc):
            grouped_attention(q, k, v, document_groups(doc), False).sum().backward()

        def causal(q=q, k=k, v=v):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        fns = {"dense_mask": dense_mask, "grouped": grouped, "causal_row": causal}
        best = dict.fromkeys(fns, float("inf"))
        saved = {name: saved_bytes(f) / 2**20 for name, f in fns.items()}  # also the warm-up
        for _ in range(reps):
            for name, f in fns.items():
                with Timer() as tm:
                    f()
                best[name] = min(best[name], tm.seconds)
        rows.append(
            {
                "seq_len": t,
                **{f"{k}_ms": 1000 * v for k, v in best.items()},
                "dense_mask_over_grouped": ratio(best["dense_mask"], best["grouped"]),
                "mask_mib": mask.numel() * mask.element_size() / 2**20,
                **{f"{k}_saved_mib": v for k, v in saved.items()},
            }
        )
    return rows


def run(attention_reps: int = 2) -> dict[str, Any]:
    from benchmarks.models import small_config
    from mm1.models.summary import summarize

    threads = set_threads()
    cfg = small_config(VOCAB, IMAGE_ID, image_size=64, max_seq_len=max(SEQ_POINTS))
    sweeps = {s: run_child("benchmarks.scaling", ["--child", s])["points"] for s in SWEEPS}
    for p in [p for points in sweeps.values() for p in points]:
        s = summarize(cfg, p["seq_len"])
        # Attention FLOPs grow with the context a token attends over: its document.
        attn = 12 * cfg.decoder.layers * cfg.decoder.dim * p["doc_len"]
        p["attention_share_of_decoder_flops"] = attn / s.decoder_flops_per_token
        p["image_share_of_flops"] = (s.image_flops * p["images"]) / (
            s.decoder_flops_per_token * p["seq_len"] + s.image_flops * p["images"]
        )
    for sweep, title in (
        ("seq", "packed 512-token documents"),
        ("seq_doc", "one document as long as the row"),
    ):
        base = sweeps[sweep][0]["ms_per_1k_tokens"]
        print_table(
            f"Step time and memory against sequence length (1 image per 1024 tokens; {title})",
            [
                "tokens",
                "step s",
                "ms / 1k tok",
                "x per-token",
                "attn FLOP share",
                "saved MiB",
                "RSS MiB",
            ],
            [
                [
                    p["seq_len"],
                    p["step_seconds"],
                    p["ms_per_1k_tokens"],
                    p["ms_per_1k_tokens"] / base,
                    p["attention_share_of_decoder_flops"],
                    p["saved_activation_mib"],
                    p["peak_rss_mib"],
                ]
                for p in sweeps[sweep]
            ],
        )
    base_i = sweeps["images"][0]["step_seconds"]
    print_table(
        "Step time and memory against images per 2048-token sequence",
        ["images", "step s", "x step", "image FLOP share", "saved MiB", "RSS MiB"],
        [
            [
                p["images"],
                p["step_seconds"],
                p["step_seconds"] / base_i,
                p["image_share_of_flops"],
                p["saved_activation_mib"],
                p["peak_rss_mib"],
            ]
            for p in sweeps["images"]
        ],
    )
    attn = attention_only(reps=attention_reps)
    print_table(
        "Attention only (4 x 64 heads, fwd + bwd, 512-token documents)",
        [
            "tokens",
            "dense mask ms",
            "grouped ms",
            "causal row ms",
            "dense / grouped",
            "saved MiB dense",
            "saved MiB grouped",
        ],
        [
            [
                r["seq_len"],
                r["dense_mask_ms"],
                r["grouped_ms"],
                r["causal_row_ms"],
                r["dense_mask_over_grouped"],
                r["dense_mask_saved_mib"],
                r["grouped_saved_mib"],
            ]
            for r in attn
        ],
    )
    out = {
        "settings": {
            "model": "CLIP ViT 64px/8 128x3 -> MLP(2) 64 tokens -> Llama 256x4 (fp32)",
            "documents": "512 tokens each, attention: auto",
            "torch_threads": threads,
            "steps_per_point": "1 warm-up + 1 timed",
        },
        "sequence_length": sweeps["seq"],
        "sequence_length_one_document": sweeps["seq_doc"],
        "images_per_sequence": sweeps["images"],
        "attention_only": attn,
    }
    path = write_result("scaling", out)
    print(f"wrote {path}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=SWEEPS, help=argparse.SUPPRESS)
    ap.add_argument("--attention-reps", type=int, default=2)
    args = ap.parse_args()
    if args.child:
        emit(child(args.child))
    else:
        run(args.attention_reps)


if __name__ == "__main__":
    main()
