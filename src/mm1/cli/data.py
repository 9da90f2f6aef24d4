"""`mm1 data ...` (synth, inspect, stats, caption-splits) and `mm1 recaption`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from mm1.config import Config, ConfigError, load_config
from mm1.data.sources import DataError
from mm1.inference_options import add_runtime_arguments

from .common import MODEL_HELP, Add, console


def cmd_data_synth(args: argparse.Namespace) -> None:
    from mm1.data.synthetic import write_world

    m = write_world(
        args.out,
        seed=args.seed,
        size=args.size,
        image_size=args.image_size,
        text_scale=args.text_scale,
        progress=True,
    )
    table = Table(title=f"synthetic world ({args.size}, seed {args.seed}) in {args.out}")
    for col in ("source", "format", "records", "images", "shards"):
        table.add_column(col, justify="right" if col in ("records", "images", "shards") else "left")
    for name, src in m.sources.items():
        table.add_row(
            name,
            src["format"],
            str(src["records"]),
            str(src.get("images", 0)),
            str(len(src["shards"])),
        )
    console.print(table)
    for split, ev in m.eval.items():
        console.print(
            f"eval/{split}: {ev['images']} images, {ev['captions']} captions, "
            f"{ev['questions']} VQA questions"
        )


def cmd_data_inspect(args: argparse.Namespace) -> None:
    import json

    from mm1.data.catalog import inspect_source
    from mm1.data.tokenizer import Tokenizer

    if args.n < 1:  # 0 or fewer samples would print a summary of nothing
        raise ConfigError(f"-n {args.n}: give 1 or more samples to show")
    world_tok = Path(args.path) / "tokenizer.json"
    tok_path = args.tokenizer or (world_tok if world_tok.is_file() else None)
    count = None
    if tok_path:
        try:
            tok = Tokenizer.from_file(tok_path)
        except ValueError as err:  # not a tokenizer: one line naming the option and the file
            msg = str(err) if str(err).startswith(str(tok_path)) else f"{tok_path}: {err}"
            raise ConfigError(f"--tokenizer {msg}" if args.tokenizer else msg) from None

        def count(text: str) -> int:
            return len(tok.encode(text))

    kwargs = {}
    if args.image_root is not None:  # as a source's `image_root` in a config
        from mm1.config.schema import IMAGE_ROOT_FORMATS
        from mm1.data.catalog import detect_format
        from mm1.data.mixture import IMAGE_ROOT_ARG

        fmt = args.format or detect_format(args.path)
        if fmt not in IMAGE_ROOT_FORMATS:
            raise ConfigError(
                f"--image-root: the {fmt} format has no image paths to resolve (it applies to "
                f"{', '.join(IMAGE_ROOT_FORMATS)})"
            )
        kwargs[IMAGE_ROOT_ARG.get(fmt, "image_root")] = Path(args.image_root)
    info = inspect_source(args.path, args.format, args.n, count_tokens=count, **kwargs)
    console.print_json(json.dumps(info, default=str))


def _image_cap_note(stats: dict, cfg: Config) -> str:
    """Why padding is high, when the image cap closed the sequences that hold most of it."""
    padding, capped = stats["padding"], stats.get("padding_image_cap", 0)
    if not padding or capped < padding / 2:
        return ""
    return (
        f" ({100 * capped / padding:.0f}% of the padding in sequences closed by "
        f"data.max_images_per_seq={cfg.data.max_images_per_seq}, not by their length)"
    )


def _counts(by_reason: dict[str, int]) -> str:
    """ "36 (missing_image=30, malformed_json=6)": a total and its reasons."""
    total = sum(by_reason.values())
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(by_reason.items()) if v)
    return f"{total} ({reasons})" if reasons else str(total)


def cmd_data_stats(args: argparse.Namespace) -> int | None:
    import json

    from mm1.data.loader import LoaderSettings, packing_stats
    from mm1.data.prompt_format import PromptFormat
    from mm1.data.world import prepare_data
    from mm1.models.build import resolve_config

    if args.sequences < 1:  # statistics of no sequences are all zeros, not an answer
        raise ConfigError(f"--sequences {args.sequences}: give 1 or more")
    cfg = load_config(args.config, args.overrides)
    # The architecture a run would build: a starting point's (LLaVA-NeXT, Fuyu) may replace
    # the configured layout, and with it each image's slots.
    data = prepare_data(cfg.data, cfg.model, init=cfg.train.init)
    tok = data.tokenizer
    model = resolve_config(cfg.model, tok.vocab_size, tok.image_id, cfg.train.init)
    q = model.num_image_tokens
    fmt = PromptFormat.from_config(cfg.data, q, model)
    settings = LoaderSettings.from_config(cfg.data, data.sources, fmt)
    stats = packing_stats(
        settings, data.tokenizer, args.sequences, progress=not args.json, read_past_error_rate=True
    )
    if args.json:
        print(json.dumps(stats, indent=1))
        return 2 if stats["error_rate_exceeded"] else None  # the JSON names the sources
    table = Table(title=f"{args.sequences} sequences of {cfg.data.seq_len} tokens, Q={q}")
    table.add_column("kind")
    table.add_column("target", justify="right")
    table.add_column("realised (documents)", justify="right")
    table.add_column("tokens", justify="right")
    for kind, target in stats["target_mixture"].items():
        table.add_row(
            kind,
            f"{100 * target:.1f}%",
            f"{100 * stats['mixture'].get(kind, 0.0):.1f}%",
            f"{stats['tokens_per_source'].get(kind, 0):,}",
        )
    console.print(table)
    console.print(
        f"packing efficiency {100 * stats['packing_efficiency']:.2f}%{_image_cap_note(stats, cfg)}"
        f"  |  images "
        f"{stats['images']:,} ({stats['tokens_per_image']:.1f} tokens each), dropped by the cap "
        f"{stats['images_dropped']} "
        f"({100 * stats['images_dropped_fraction']:.2f}%)  |  documents cut "
        f"{stats['pieces_cut']}, truncated {stats['truncated']}  |  records skipped "
        f"{_counts(stats['read']['skipped'])}"
        f"  |  text repaired {sum(stats['read']['repaired'].values())}"
    )
    over = stats["error_rate_exceeded"]
    if over:  # after the table: it is what one looks at to see why
        more = f" (and {len(over) - 1} more source(s) over the rate)" if len(over) > 1 else ""
        raise DataError(over[0] + more)


def cmd_data_caption_splits(args: argparse.Namespace) -> None:
    import json

    from mm1.data.caption_splits import write_caption_splits

    r = write_caption_splits(args.world, args.fraction, args.seed)
    console.print(json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}))


def cmd_recaption(args: argparse.Namespace) -> None:
    from mm1.recaption import RecaptionSettings, recaption

    settings = RecaptionSettings(
        args.batch_size, args.max_new_tokens, args.fuse, args.compile, args.dtype
    )
    record = recaption(args.checkpoint, args.inputs, args.out, settings, device=args.device)
    # Only what this call generated: shards a resumed run finished earlier are counted apart.
    now = record["this_run"]
    earlier = f" ({now['already_done']} already done)" if now["already_done"] else ""
    console.print(
        f"{len(record['shards'])} shards{earlier}, {now['captions']} captions generated "
        f"-> {args.out}"
    )


def register(add: Add) -> None:
    group = add("data", lambda a: None, "synthetic world, inspection and packing statistics")
    data = group.add_subparsers(dest="data_command", required=True)
    p = add("synth", cmd_data_synth, "write the synthetic world", data)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="tiny", choices=("tiny", "small", "medium"))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument(
        "--text-scale", type=float, default=1.0, help="text around images: 1 web-like, 0 compact"
    )
    p = add("inspect", cmd_data_inspect, "what a source holds: counts and decoded samples", data)
    p.add_argument("path")
    p.add_argument("--format", default=None)
    p.add_argument("-n", type=int, default=3)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json for token lengths")
    p.add_argument(
        "--image-root",
        default=None,
        help="the folder image paths are under (a source's image_root)",
    )
    p = add("stats", cmd_data_stats, "mixture and packing statistics of a config", data)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--sequences", type=int, default=200)
    p.add_argument("--json", action="store_true")
    p = add(
        "caption-splits",
        cmd_data_caption_splits,
        "clean-caption splits of a world's alt-text images (re-captioning study)",
        data,
    )
    p.add_argument("world")
    p.add_argument("--fraction", type=float, default=0.05, help="share in the clean subset")
    p.add_argument("--seed", type=int, default=0)

    p = add("recaption", cmd_recaption, "caption WebDataset shards with a trained model")
    p.add_argument("checkpoint", help=MODEL_HELP)
    p.add_argument(
        "--in", dest="inputs", required=True, help="a .tar shard, a folder of them, or a glob"
    )
    p.add_argument("--out", required=True, help="folder for the new shards (same names)")
    p.add_argument("--fuse", action="store_true", help="caption = generated + original alt-text")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step at fixed shapes (a CUDA graph per step on GPU)",
    )
    add_runtime_arguments(p)
