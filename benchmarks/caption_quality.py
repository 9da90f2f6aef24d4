"""How good are a caption source's captions? (study (d) of docs/ablations.md)

`python -m benchmarks.caption_quality NAME=SHARDS ... --reference SHARDS [--skip-subset FRACTION]
[--json OUT]` scores the `.txt` caption of every sample of each named WebDataset source against
the scene its json records (the synthetic world's ground truth) and against the clean caption of
the same key in `--reference` (the world's `captions_clean`):

- object recall: the share of the scene's objects whose colour and shape are named together
  (the demo report's measure, `mm1.demo.object_recall`); colour recall and shape recall: the
  share whose colour, or shape, word appears at all;
- CIDEr-D and BLEU-4 against the clean caption as the one reference (PTB-tokenized, as
  pycocoevalcap computes them), over the keys every source has.

`--skip-subset F` leaves out the keys of the clean subset (`mm1 data caption-splits --fraction F`,
seed 0), which the re-captioner trained on, so the bulk is what is scored.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

from mm1.data.caption_splits import in_subset, tar_samples
from mm1.demo import object_recall
from mm1.eval.metrics import bleu, cider, ptb_tokenize_corpus
from mm1.recaption import input_shards


def read_source(spec: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """{key: (caption, scene)} of every sample of the shards `spec` names."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for shard in input_shards(spec):
        for key, group in tar_samples(shard):
            meta = json.loads(group["json"])
            scene = meta["scene"] if isinstance(meta.get("scene"), dict) else {}
            out[key] = (group["txt"].decode("utf-8"), scene)
    return out


def named_share(caption: str, scene: dict[str, Any], field: str) -> float:
    """The share of the scene's objects whose `field` ("color" or "shape") word the caption has."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    objects = scene.get("objects", [])
    if not objects:
        return 0.0
    return sum(o[field].split()[-1] in words for o in objects) / len(objects)


def score_sources(
    sources: dict[str, dict[str, tuple[str, dict[str, Any]]]],
    reference: dict[str, tuple[str, dict[str, Any]]],
    keys: list[str],
) -> dict[str, dict[str, float]]:
    """{source: {metric: value}} over `keys`, each caption scored against its scene and the
    reference caption of its key."""
    refs = ptb_tokenize_corpus({k: [reference[k][0]] for k in keys})
    rows: dict[str, dict[str, float]] = {}
    for name, records in sources.items():
        cands = {
            k: toks[0]
            for k, toks in ptb_tokenize_corpus({k: [records[k][0]] for k in keys}).items()
        }
        scenes = [reference[k][1] for k in keys]  # the ground truth, whatever the source kept
        caps = [records[k][0] for k in keys]
        rows[name] = {
            "object_recall": statistics.fmean(map(object_recall, caps, scenes)),
            "colour_recall": statistics.fmean(
                named_share(c, s, "color") for c, s in zip(caps, scenes)
            ),
            "shape_recall": statistics.fmean(
                named_share(c, s, "shape") for c, s in zip(caps, scenes)
            ),
            "cider_vs_clean": 100 * cider(refs, cands)[0],
            "bleu4_vs_clean": 100 * bleu(refs, cands)[0][3],
            "words": statistics.fmean(len(c.split()) for c in caps),
        }
    return rows


def markdown(rows: dict[str, dict[str, float]], n: int) -> str:
    lines = [
        f"| source ({n} captions) | object recall | colour recall | shape recall | "
        "CIDEr vs clean | BLEU-4 vs clean | words |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['object_recall']:.3f} | {r['colour_recall']:.3f} | "
            f"{r['shape_recall']:.3f} | {r['cider_vs_clean']:.1f} | {r['bleu4_vs_clean']:.1f} | "
            f"{r['words']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", metavar="NAME=SHARDS")
    ap.add_argument("--reference", required=True, help="the clean captions' shards")
    ap.add_argument("--skip-subset", type=float, default=0.0, metavar="FRACTION")
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    specs = dict(s.split("=", 1) for s in args.sources)
    sources = {name: read_source(spec) for name, spec in specs.items()}
    reference = read_source(args.reference)
    keys = sorted(set(reference).intersection(*sources.values()))
    for name, records in sources.items():
        other = [k for k in keys if records[k][1] and records[k][1] != reference[k][1]]
        if other:  # same key, another image: not the reference's sample
            raise SystemExit(f"{name}: key {other[0]} shows another scene than --reference's")
    if args.skip_subset:
        keys = [k for k in keys if not in_subset(k, args.skip_subset, args.subset_seed)]
    if not keys:
        raise SystemExit("no key is in every source and the reference")
    rows = score_sources(sources, reference, keys)
    print(markdown(rows, len(keys)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "captions": len(keys),
            "sources": specs,
            "reference": args.reference,
            "skip_subset": args.skip_subset,
            "scores": rows,
        }
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
