"""`mm1 demo`, `mm1 train`, `mm1 info` and `mm1 ablate`: runs and what they cost."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.table import Table

from mm1.config import Config, ConfigError, ModelConfig, load_config

from .common import RESHARD_HELP, Add, console, first_rank, skipped_note


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from mm1.models.family import family_spec
    from mm1.models.summary import summarize
    from mm1.train.optim import mm1_peak_lr
    from mm1.train.parallel import fsdp_shards, refuse_unsupported_processes
    from mm1.train.state_memory import training_state_bytes

    if args.seq_len < 0:  # would print negative FLOPs
        raise ConfigError(f"--seq-len {args.seq_len} must be positive (0: the model's max_seq_len)")
    if args.processes < 1:
        raise ConfigError(f"--processes {args.processes} must be at least 1")
    _refuse_other_yaml(args.config)
    cfg = load_config(args.config, args.overrides)
    refuse_unsupported_processes(cfg.train, args.processes)  # before the tables
    model_cfg, vocab_from = _built_model_config(cfg)
    s = summarize(model_cfg, args.seq_len or model_cfg.decoder.max_seq_len)
    tokenizer = family_spec(model_cfg.family).image_tokenizer
    table = Table(title=f"{args.config}  (built on the meta device: no weights allocated)")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("share", justify="right")
    has_encoder = family_spec(model_cfg.family).has_encoder
    image_rows = (
        (
            ("image tokenizer (frozen)" if tokenizer else "vision encoder", s.vision),
            ("connector", s.connector),
        )
        if has_encoder
        else (
            ("patches' Linear, newline (no encoder)", s.vision + s.connector),
        )  # fuyu: its only image part
    )
    for name, n in (
        *image_rows,
        ("decoder (all)", s.decoder),
        ("  of which embeddings", s.embeddings),
        ("  of which non-embedding", s.decoder - s.embeddings),
        ("  active per token", s.active),
        *((("image heads (regression)", s.heads),) if s.heads else ()),
        ("total", s.total),
        ("total active per token", s.total - s.decoder + s.active),
    ):
        table.add_row(name, f"{n:,} ({_human(n)})", f"{100 * n / s.total:.1f}%")
    console.print(table)
    codebook = family_spec(model_cfg.family).codebook_size
    codes = f" + {codebook(model_cfg):,} image codes" if codebook else ""
    console.print(f"vocabulary: {model_cfg.decoder.vocab_size:,} ({vocab_from}){codes}")
    m = model_cfg
    family = family_spec(m.family)
    patches = (
        f"{m.vision.image_size}px / patch {m.vision.patch_size} = {m.vision.num_patches} patches, "
        if family.has_encoder
        else ""  # the family's own description says how it cuts the image
    )
    console.print(f"image: {patches}{family.describe(m)} -> {s.image_tokens} image tokens")
    crops, slots = _layout_ranges(cfg, m, s.image_tokens)
    canvas = m.image_layout.canvas if m.image_layout.type == "fuyu" else None
    px = f"{canvas[0]} x {canvas[1]}px" if canvas else f"{m.vision.image_size}px"
    console.print(
        f"image layout {m.image_layout.type}: {_span(crops)} crop(s) of {px} "
        f"-> {_span(slots)} image tokens per image"
    )
    console.print(
        f"training FLOPs per decoder token (seq {s.seq_len}): {_human(s.decoder_flops_per_token)}"
    )
    parts = ("encoder + connector" if has_encoder else "patches' Linear") + (
        " + image heads" if s.heads else ""
    )
    console.print(f"training FLOPs per crop ({parts}): {_human(s.image_flops)}")
    k = cfg.data.max_images_per_seq
    most = "" if crops[0] == crops[1] else "at most "
    console.print(
        f"training FLOPs per token with {k} images per sequence: {most}"
        f"{_human(s.flops_per_token(k * crops[1]))}"
    )
    console.print(
        f"MM1 peak learning rate for N = {_human(s.active)} active decoder parameters "
        f"(embeddings counted): {mm1_peak_lr(s.active):.3g}"
    )
    with torch.device("meta"):
        shell = family.model(model_cfg)
    n = args.processes
    b = training_state_bytes(shell, cfg.train, n)
    shards = fsdp_shards(cfg.train, n)
    if n == 1:
        where = "one process; --processes N: each of N"
    elif shards == 1:
        where = f"per process of {n}, each whole under DDP"
    else:
        over = f"{shards}, replicated {n // shards}x (HSDP)" if shards < n else "all"
        where = f"per process of {n}, sharded by FSDP2 over {over}: the first holds the most"
    console.print(
        f"model states in training: {_size(b.total)} = weights {_size(b.weights)} + gradients "
        f"{_size(b.gradients)} + AdamW {_size(b.optimizer)} (what train.* trains, {where}; "
        "activations not counted)"
    )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _refuse_other_yaml(path: str) -> None:
    """The repository's other YAML files (an encoder config, a study grid) name the command
    that takes them, rather than failing as an MM1 config ("Key 'encoder' not in 'Config'")."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return  # load_config reports it
    if not isinstance(raw, dict):
        return
    if "encoder" in raw:
        raise ConfigError(
            f"{path}: an encoder config: train it with mm1 train-encoder {path} "
            "(mm1 info summarises MM1 configs)"
        )
    if "study" in raw:
        raise ConfigError(
            f"{path}: a study grid: list its cells and their cost with mm1 ablate {path} "
            "--dry-run (mm1 info summarises MM1 configs)"
        )


def _layout_ranges(
    cfg: Config, model_cfg: ModelConfig, image_tokens: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(fewest, most) crops and image tokens per image under the model's image layout, over
    images from one crop to 4 x 4 crops and aspect ratios from 1:6 to 6:1."""
    from mm1.data.prompt_format import PromptFormat

    fmt = PromptFormat.from_config(cfg.data, image_tokens, model_cfg)
    side = model_cfg.vision.image_size
    shapes = [(1, 1), (2, 2), (4, 4), (2, 1), (1, 2), (4, 3), (3, 4), (6, 1), (1, 6)]
    sizes = [(side * w, side * h) for w, h in shapes]
    crops = [fmt.crops_for_size(size) for size in sizes]
    slots = [fmt.slots_for_size(size) for size in sizes]
    return (min(crops), max(crops)), (min(slots), max(slots))


def _span(lo_hi: tuple[int, int]) -> str:
    lo, hi = lo_hi
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def _built_model_config(cfg: Config) -> tuple[ModelConfig, str]:
    """The architecture training would build: HF starting points' shapes and the tokenizer's
    vocabulary (without writing a synthetic world), and where the vocabulary comes from."""
    from mm1.data.synthetic import WorldManifest
    from mm1.data.tokenizer import Tokenizer
    from mm1.data.world import configured_tokenizer, read_tokenizer
    from mm1.models.build import resolve_config

    world = Path(cfg.data.world)
    init = cfg.train.init
    configured = configured_tokenizer(cfg.data, init)
    if configured is not None:
        tok, where = read_tokenizer(*configured), str(configured[0])
    elif (world / "world.json").is_file():
        tok = Tokenizer.from_file(WorldManifest.load(world).tokenizer_path)
        where = f"the world at {world}"
    else:
        how = f"the config; training sets it from the synthetic world's tokenizer ({world})"
        return resolve_config(cfg.model, init=init), how
    resolved = resolve_config(cfg.model, tok.vocab_size, tok.image_id, init)
    return resolved, f"the tokenizer of {where}"


def cmd_train(args: argparse.Namespace) -> int | None:
    from mm1.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    result = Trainer(cfg, force=args.force, reshard=args.reshard).fit()
    if result["stopped_by"]:
        # Not a success: a job script must see that training did not finish (128 + signal, as
        # the shell reports a process killed by it; every rank exits so under torchrun).
        if first_rank():
            _print_stopped(args, cfg, result)
        return 128 + result["stopped_by"]
    if not first_rank():  # under torchrun, one summary line
        return None
    if result["steps_run"] == 0:
        console.print(
            f"{cfg.train.run_dir} is already at step {result['step']} (train.steps): nothing to "
            "train; raise train.steps to go on"
        )
        return
    done = f"done: step {result['step']}, loss {result['loss']:.4f} -> {cfg.train.run_dir}"
    console.print(done + skipped_note(result))
    return None


def _print_stopped(args: argparse.Namespace, cfg: Config, result: dict) -> None:
    import shlex
    import signal

    name = signal.Signals(result["stopped_by"]).name
    train = ["train", args.config, *args.overrides, *(["--force"] if args.force else [])]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world == 1:
        command = shlex.join(["mm1", *train])
    else:  # the same world size: per-rank state is not remapped
        launch = ["torchrun", f"--nproc_per_node={local}", "-m", "mm1.cli"]
        nodes = f" on each of {world // local} nodes" if world != local else ""
        command = shlex.join([*launch, *train]) + nodes
    console.print(
        f"stopped early by {name} at step {result['step']} of {cfg.train.steps} (checkpoint "
        f"saved in {cfg.train.run_dir}); resume with {command}",
        soft_wrap=True,
    )


def cmd_demo(args: argparse.Namespace) -> int | None:
    from mm1.demo import run_demo
    from mm1.train.errors import StoppedBySignal

    if args.sft_overrides and not args.sft:
        raise ConfigError("--sft-override is for the SFT stage: give it with --sft")
    try:
        report = run_demo(args.out, overrides=args.overrides)
        if args.sft:
            from mm1.demo_sft import add_to_demo_report, run_sft_demo

            sft = run_sft_demo(args.out, overrides=args.sft_overrides or ())
            add_to_demo_report(report, sft)
    except StoppedBySignal as stop:  # saved: rerunning the same command resumes that stage
        import shlex
        import signal

        again = ["mm1", "demo", "--out", args.out, *(["--sft"] if args.sft else [])]
        again += [*args.overrides, *(f"--sft-override={o}" for o in args.sft_overrides or ())]
        console.print(
            f"stopped early by {signal.Signals(stop.signum).name} at step {stop.step} of "
            f"{stop.steps} (checkpoint saved in {stop.run_dir}); resume with {shlex.join(again)}",
            soft_wrap=True,
        )
        return 128 + stop.signum
    return None


def cmd_ablate(args: argparse.Namespace) -> int | None:
    from mm1.ablate.command import ablate, dry_run

    if args.dry_run:
        dry_run(args.grid, args.out, jobs=args.jobs)
        return None
    return ablate(args.grid, args.out, jobs=args.jobs, force=args.force) or None


def register(add: Add) -> None:
    p = add("demo", cmd_demo, "the end-to-end demo on the built-in synthetic world")
    p.add_argument("--out", default="runs/demo")
    p.add_argument(
        "--sft",
        action="store_true",
        help="then fine-tune the result on the world's conversations (OUT_sft, 21 more minutes)",
    )
    p.add_argument(
        "--sft-override",
        dest="sft_overrides",
        action="append",
        metavar="KEY=VALUE",
        help="a section.key=value for the SFT stage (repeatable; with --sft)",
    )
    p.add_argument(
        "overrides", nargs="*", help="section.key=value for pre-training (not the SFT stage)"
    )

    p = add("train", cmd_train, "pre-train (or continue) a run; resumes from its run_dir")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument(
        "--force",
        action="store_true",
        help="resume even if the config or a data source's files changed",
    )
    p.add_argument("--reshard", action="store_true", help=RESHARD_HELP)

    p = add("info", cmd_info, "parameters, FLOPs and the MM1 peak lr of a model config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--seq-len", type=int, default=0)
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="training processes (GPUs): the model states each holds under train.parallel",
    )

    p = add("ablate", cmd_ablate, "train and evaluate a grid of configs into a study's tables")
    p.add_argument("grid", help="the grid YAML (base config, axes or cells, seeds)")
    p.add_argument("--out", default=None, help="study directory (default: runs/ablations/STUDY)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their cost")
    p.add_argument("--jobs", type=int, default=1, help="cells in parallel, CPUs split between")
    p.add_argument("--force", action="store_true", help="run in a study dir of another grid")
