"""The `mm1` command: the one place that wires configs, data, models, training and evaluation."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from mm1.config import ConfigError, load_config

console = Console()


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def cmd_info(args: argparse.Namespace) -> None:
    from mm1.models.summary import summarize
    from mm1.train.optim import mm1_peak_lr

    cfg = load_config(args.config, args.overrides)
    s = summarize(cfg.model, args.seq_len or cfg.model.decoder.max_seq_len)
    table = Table(title=f"{args.config}  (built on the meta device: no weights allocated)")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("share", justify="right")
    for name, n in (
        ("vision encoder", s.vision),
        ("connector", s.connector),
        ("decoder (all)", s.decoder),
        ("  of which embeddings", s.embeddings),
        ("  of which non-embedding", s.decoder - s.embeddings),
        ("total", s.total),
    ):
        table.add_row(name, f"{n:,} ({_human(n)})", f"{100 * n / s.total:.1f}%")
    console.print(table)
    m = cfg.model
    console.print(
        f"image: {m.vision.image_size}px / patch {m.vision.patch_size} = "
        f"{m.vision.num_patches} patches -> {m.connector.type} -> {s.image_tokens} image tokens"
    )
    console.print(
        f"training FLOPs per decoder token (seq {s.seq_len}): {_human(s.decoder_flops_per_token)}"
    )
    console.print(f"training FLOPs per image (encoder + connector): {_human(s.image_flops)}")
    k = cfg.data.max_images_per_seq
    console.print(
        f"training FLOPs per token with {k} images per sequence: {_human(s.flops_per_token(k))}"
    )
    console.print(
        f"MM1 peak learning rate for N = {_human(s.decoder)} decoder parameters "
        f"(embeddings counted): {mm1_peak_lr(s.decoder):.3g}"
    )


def cmd_demo(args: argparse.Namespace) -> None:
    from mm1.demo import run_demo

    run_demo(args.out, overrides=args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm1", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, fn: Callable[[argparse.Namespace], None], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = add("info", cmd_info, "parameters, FLOPs and the MM1 peak lr of a model config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--seq-len", type=int, default=0)

    p = add("demo", cmd_demo, "the end-to-end demo on the built-in synthetic world")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as err:
        console.print(f"[bold red]config error:[/] {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
