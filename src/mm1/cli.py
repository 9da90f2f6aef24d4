"""The `mm1` command: the one place that wires configs, data, models, training and evaluation."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mm1.config import Config, ConfigError, EvalConfig, ModelConfig, load_config
from mm1.serve import add_arguments as serve_arguments

if TYPE_CHECKING:
    from PIL import Image

    from mm1.data.tokenizer import Tokenizer

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
    model_cfg, vocab_from = _built_model_config(cfg)
    s = summarize(model_cfg, args.seq_len or model_cfg.decoder.max_seq_len)
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
        ("  active per token", s.active),
        ("total", s.total),
        ("total active per token", s.total - s.decoder + s.active),
    ):
        table.add_row(name, f"{n:,} ({_human(n)})", f"{100 * n / s.total:.1f}%")
    console.print(table)
    console.print(f"vocabulary: {model_cfg.decoder.vocab_size:,} ({vocab_from})")
    m = model_cfg
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
        f"MM1 peak learning rate for N = {_human(s.active)} active decoder parameters "
        f"(embeddings counted): {mm1_peak_lr(s.active):.3g}"
    )


def _built_model_config(cfg: Config) -> tuple[ModelConfig, str]:
    """The architecture training would build: HF starting points' shapes and the tokenizer's
    vocabulary (without writing a synthetic world), and where the vocabulary comes from."""
    from mm1.data.synthetic import WorldManifest
    from mm1.data.tokenizer import Tokenizer
    from mm1.data.world import saved_tokenizer_dir
    from mm1.models.build import resolve_config

    world = Path(cfg.data.world)
    init = cfg.train.init
    tok_init = init.decoder or init.weights
    tok_path = cfg.data.tokenizer or (saved_tokenizer_dir(tok_init) if tok_init else None)
    if tok_path:
        where = str(tok_path)
    elif (world / "world.json").is_file():
        tok_path, where = WorldManifest.load(world).tokenizer_path, f"the world at {world}"
    else:
        how = f"the config; training sets it from the synthetic world's tokenizer ({world})"
        return resolve_config(cfg.model, init=init), how
    tok = Tokenizer.from_file(tok_path)
    resolved = resolve_config(cfg.model, tok.vocab_size, tok.image_id, init)
    return resolved, f"the tokenizer of {where}"


def cmd_train(args: argparse.Namespace) -> int | None:
    from mm1.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    result = Trainer(cfg, force=args.force).fit()
    if result["stopped_by"]:
        # Not a success: a job script must see that training did not finish (128 + signal, as
        # the shell reports a process killed by it; every rank exits so under torchrun).
        if os.environ.get("RANK", "0") == "0":
            _print_stopped(args, cfg, result)
        return 128 + result["stopped_by"]
    if os.environ.get("RANK", "0") != "0":  # under torchrun, one summary line
        return None
    if result["steps_run"] == 0:
        console.print(
            f"{cfg.train.run_dir} is already at step {result['step']} (train.steps): nothing to "
            "train; raise train.steps to go on"
        )
        return
    console.print(f"done: step {result['step']}, loss {result['loss']:.4f} -> {cfg.train.run_dir}")
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

    world_tok = Path(args.path) / "tokenizer.json"
    tok_path = args.tokenizer or (world_tok if world_tok.is_file() else None)
    count = None
    if tok_path:
        tok = Tokenizer.from_file(tok_path)

        def count(text: str) -> int:
            return len(tok.encode(text))

    info = inspect_source(args.path, args.format, args.n, count_tokens=count)
    console.print_json(json.dumps(info, default=str))


def cmd_data_stats(args: argparse.Namespace) -> None:
    import json

    from mm1.data.loader import LoaderSettings, packing_stats
    from mm1.data.prompt_format import PromptFormat
    from mm1.data.world import prepare_data

    cfg = load_config(args.config, args.overrides)
    data = prepare_data(cfg.data, cfg.model, init=cfg.train.init)
    q = cfg.model.num_image_tokens
    fmt = PromptFormat.from_config(cfg.data, q, cfg.model)
    settings = LoaderSettings.from_config(cfg.data, data.sources, fmt)
    stats = packing_stats(settings, data.tokenizer, args.sequences, progress=not args.json)
    if args.json:
        print(json.dumps(stats, indent=1))
        return
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
        f"packing efficiency {100 * stats['packing_efficiency']:.2f}%  |  images "
        f"{stats['images']:,} ({stats['tokens_per_image']:.1f} tokens each), dropped by the cap "
        f"{stats['images_dropped']} "
        f"({100 * stats['images_dropped_fraction']:.2f}%)  |  documents cut "
        f"{stats['pieces_cut']}  |  records skipped {sum(stats['read']['skipped'].values())}"
        f"  |  text repaired {sum(stats['read']['repaired'].values())}"
    )


def cmd_convert(args: argparse.Namespace) -> None:
    from mm1.pretrained import load_pretrained, save_pretrained

    p = load_pretrained(args.source)
    if args.export:
        out = save_pretrained(p.model, p.tokenizer, p.processor, args.export, p.prompt_format)
        console.print(f"exported {args.source} -> {out}")
    if args.to_hf:
        from mm1.hf_export import save_hf

        console.print(save_hf(p, args.to_hf, args.hf_type)[1])
    if not args.export and not args.to_hf:
        raise ConfigError("convert: give --export DIR and/or --to-hf DIR")


def cmd_upcycle(args: argparse.Namespace) -> None:
    from mm1.upcycling import upcycle

    out = upcycle(
        args.source, args.out, args.experts, args.every, args.top_k, args.noise, args.seed
    )
    console.print(f"upcycled {args.source} -> {out} ({args.experts} experts every {args.every})")


def _split_stops(stops: list[str], tokenizer: Tokenizer) -> tuple[list[int], list[str]]:
    """(token ids, text stops) of `--stop` values. A stop that is exactly a special token
    (e.g. `<|endofchunk|>`) must stop by id: decoding skips special tokens, so it never shows
    up in the text a stop string is matched against (as in `FewShotEvaluator`)."""
    ids: list[int] = []
    texts: list[str] = []
    for stop in stops:
        tid = tokenizer.token_to_id(stop)
        if tid is not None and tokenizer.decode([tid]) == "":
            ids.append(tid)
        else:
            texts.append(stop)
    return ids, texts


def _load_images(paths: list[str]) -> list[Image.Image]:
    """Images decoded as training and evaluation decode them (transparency onto white)."""
    from mm1.data.sources import DataError
    from mm1.data.sources.base import BadImage, image_from_path

    try:
        return [image_from_path(Path(path)) for path in paths]
    except BadImage as err:
        raise DataError(f"--image: {err.detail}") from None


def cmd_generate(args: argparse.Namespace) -> None:
    from mm1.data.tokenizer import IMAGE_TOKEN, tokenize_chat_prompt, tokenize_prompt
    from mm1.models.generation import generate
    from mm1.pretrained import load_pretrained

    tags, n = args.prompt.count(IMAGE_TOKEN), len(args.image or [])
    if tags != n:
        raise ConfigError(
            f"--prompt has {tags} {IMAGE_TOKEN} tag(s) but {n} --image given: put one "
            f"{IMAGE_TOKEN} where each image goes, e.g. --prompt '{IMAGE_TOKEN}Output:'"
        )
    p = load_pretrained(args.model)
    images = _load_images(args.image)
    # Written as the model was trained: its image slots, boundaries and chat template.
    fmt = p.prompt_format
    if args.chat:
        user = [{"role": "user", "content": args.prompt}]
        ids = tokenize_chat_prompt(user, images, p.tokenizer, fmt)
    else:
        ids = tokenize_prompt(args.prompt, images, p.tokenizer, fmt)
    pixels = fmt.pixel_values(p.processor, images) if images else None
    crops, sizes = fmt.image_info(images) if images else (None, None)
    stop_ids, text_stops = _split_stops(args.stop or [], p.tokenizer)
    if args.chat:  # the assistant's turn ends at the template's end-of-turn token
        turn_ends = _split_stops(list(p.tokenizer.end_of_turn_tokens()), p.tokenizer)[0]
        stop_ids += [t for t in turn_ends if t not in stop_ids]
    out = generate(
        p.model,
        [ids],
        pixels,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature,
        top_p=args.top_p,
        eos_token_id=[p.tokenizer.eos_id, *stop_ids],
        pad_token_id=p.tokenizer.pad_id,
        stop_strings=text_stops,
        tokenizer=p.tokenizer,
        image_crops=crops,
        image_sizes=sizes,
    )[0]
    # generate keeps the token it stopped at: cut at a special stop (text stops are cut below).
    out = out[: next((i for i, t in enumerate(out) if t in stop_ids), len(out))]
    text = p.tokenizer.decode(out)
    for stop in text_stops:
        text = text.split(stop)[0]
    print(text)


def cmd_chat(args: argparse.Namespace) -> int | None:
    from mm1.chat import (
        ChatSession,
        ChatSettings,
        answer_once,
        message_images,
        resolve_chat_template,
        run_interactive,
    )
    from mm1.pretrained import load_pretrained

    if args.image and args.message is None:
        raise ConfigError("--image goes with --message (interactively: /image PATH)")
    settings = ChatSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    settings.validate()
    # A script's mistakes (a missing image, a tag count) are reported before the model loads.
    images = None if args.message is None else message_images(args.message, args.image)
    p = load_pretrained(args.model, args.device)
    template = resolve_chat_template(p.tokenizer, args.chat_template)
    if template.notice:
        print(f"note: {template.notice}", file=sys.stderr)
    session = ChatSession(p, template, settings)
    if images is None:
        run_interactive(session)
        return None
    return 130 if answer_once(session, args.message, images).stopped else None


def cmd_serve(args: argparse.Namespace) -> None:
    from mm1.serve import run

    run(args)


def cmd_eval(args: argparse.Namespace) -> None:
    if args.suite:
        return cmd_eval_suite(args)
    from mm1.config import to_dict
    from mm1.eval.fewshot import evaluate
    from mm1.eval.report import write_report
    from mm1.eval.tasks import SYNTHETIC_TASKS, TASKS, register_task_file
    from mm1.pretrained import load_pretrained

    model_dir = Path(args.model)
    e, settings = _eval_settings(model_dir, args)
    shots = e.shots
    # With a task file and no tasks named (--tasks or eval.tasks=...), only its tasks run.
    named = bool(args.tasks) or any(o.startswith("eval.tasks=") for o in args.overrides)
    tasks = list(e.tasks) if named or not args.task_file else []
    if args.task_file:
        tasks += [t for t in register_task_file(args.task_file) if t not in tasks]
    unknown = [t for t in tasks if t not in TASKS and t not in SYNTHETIC_TASKS]
    if unknown:
        known = ", ".join(sorted(set(TASKS) | set(SYNTHETIC_TASKS)))
        raise ConfigError(
            f"--tasks: unknown {', '.join(unknown)}; known: {known}; describe your own tasks "
            "with --task-file"
        )
    # Few-shot needs demonstrations: fail before loading anything, with the fix in the message
    # (evaluate would only raise a bare ValueError once the model and the tasks are loaded).
    few = [k for k in shots if k > 0]
    for name in tasks:
        spec = None if name in SYNTHETIC_TASKS else TASKS.get(name)
        if few and spec is not None and spec.support is None:
            where = f" in {args.task_file}" if args.task_file else ""
            raise ConfigError(
                f"task {name!r} has no support split to draw {few[0]}-shot demonstrations "
                f"from: add a `support:` split to it{where} (same keys as `query:`), "
                "or evaluate it zero-shot only with --shots 0"
            )
    world = args.world or _run_world(model_dir)
    synthetic = [t for t in tasks if t in SYNTHETIC_TASKS]
    if synthetic and not (Path(world) / "world.json").is_file():
        raise ConfigError(
            f"{', '.join(synthetic)} need the synthetic world the model was trained on; none at "
            f"{world}: pass --world DIR, or evaluate your own tasks with --task-file"
        )
    p = load_pretrained(model_dir)
    results = evaluate(
        p.model,
        p.tokenizer,
        p.processor,
        e,
        tasks=tasks,
        world=world,
        prompt_format=p.prompt_format,  # prompts written as the model was trained
        name=args.name or model_dir.name,
    )
    results["settings"] = {**settings, "eval": {**to_dict(e), "tasks": tasks}}
    out = Path(args.out or model_dir / EVAL_OUT)
    files = write_report(results, out)
    console.print(Path(files["markdown"]).read_text().split("\n\n###")[0])
    console.print(f"results: {files['json']}  table: {files['markdown']}  plot: {files['plot']}")


def cmd_eval_suite(args: argparse.Namespace) -> None:
    from mm1.eval.suite import run_suite
    from mm1.pretrained import load_pretrained

    world = args.world or _run_world(Path(args.model))
    s = args.seeds if args.seeds is not None else 3
    kw = {"mode": args.suite_mode, "seeds": s, "max_examples": args.max_examples or 0}
    kw["shuffle_images"] = args.shuffle_images
    p = load_pretrained(args.model)
    r = run_suite(p, args.model, args.suite, world=world, name=args.name, out=args.out, **kw)
    console.print(Path(r["files"]["markdown"]).read_text().split("\n\n## ")[0])
    console.print(f"results: {r['files']['json']}  plot: {r['files']['plot']}")


# `mm1 eval`'s own folder: `eval/` holds the demo's evaluation, which its report links to.
EVAL_OUT = "eval-cli"


def _eval_settings(model_dir: Path, args: argparse.Namespace) -> tuple[EvalConfig, dict]:
    """The run's own `eval` section (its saved config.yaml; the defaults for an export), then
    `eval.*` overrides, then the flags; and a record of where they came from."""
    from dataclasses import replace

    from mm1.config import load_eval_config, validate_eval

    saved = model_dir / "config.yaml"
    e = load_eval_config(saved if saved.is_file() else None, args.overrides)
    flags: dict[str, object] = {}
    if args.shots is not None:
        try:
            flags["shots"] = [int(s) for s in args.shots.split(",")]
        except ValueError:
            raise ConfigError(f"--shots {args.shots!r}: give shot counts like 0,4,8") from None
    if args.tasks:
        flags["tasks"] = [t for t in args.tasks.split(",") if t]
    for flag, key in (
        ("seeds", "seeds"),
        ("beams", "num_beams"),
        ("batch_size", "batch_size"),
        ("max_examples", "max_examples"),
        ("bad_images", "bad_images"),
    ):
        if getattr(args, flag) is not None:
            flags[key] = getattr(args, flag)
    if args.rices:
        flags["demo_selection"] = "rices"
    if args.shuffle_images:
        flags["shuffle_images"] = True
    e = replace(e, **flags)  # type: ignore[arg-type]
    validate_eval(e)
    source = str(saved) if saved.is_file() else f"defaults (no config.yaml in {model_dir})"
    return e, {"from": source, "overrides": list(args.overrides), "flags": flags}


def _run_world(model_dir: Path) -> str:
    """The synthetic world a run trained on (its saved config), else the default location."""
    saved = model_dir / "config.yaml"
    if saved.is_file():
        import yaml

        world = ((yaml.safe_load(saved.read_text()) or {}).get("data") or {}).get("world")
        if world:
            return str(world)
    return "data/world"


def cmd_demo(args: argparse.Namespace) -> None:
    from mm1.demo import run_demo

    report = run_demo(args.out, overrides=args.overrides)
    if not args.no_sft:
        from mm1.demo_sft import add_to_demo_report, run_sft_demo

        add_to_demo_report(report, run_sft_demo(args.out))


def cmd_ablate(args: argparse.Namespace) -> int | None:
    from mm1.ablate.command import ablate, dry_run

    if args.dry_run:
        dry_run(args.grid, args.out)
        return None
    return ablate(args.grid, args.out, jobs=args.jobs, force=args.force) or None


def cmd_recaption(args: argparse.Namespace) -> None:
    from mm1.recaption import RecaptionSettings, recaption

    settings = RecaptionSettings(args.batch_size, args.max_new_tokens, args.fuse)
    record = recaption(args.checkpoint, args.inputs, args.out, settings)
    n = sum(c["recaptioned"] for c in record["shards"].values())
    console.print(f"{len(record['shards'])} shards, {n} captions generated -> {args.out}")


def cmd_data_caption_splits(args: argparse.Namespace) -> None:
    import json

    from mm1.data.caption_splits import write_caption_splits

    r = write_caption_splits(args.world, args.fraction, args.seed)
    console.print(json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm1",
        description="Pre-train, fine-tune and evaluate multimodal LLMs the way Apple's MM1 does.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str,
        fn: Callable[[argparse.Namespace], int | None],
        help: str,
        on: argparse._SubParsersAction = sub,
    ) -> argparse.ArgumentParser:
        p = on.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = add("demo", cmd_demo, "the end-to-end demo on the built-in synthetic world")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--no-sft", action="store_true", help="skip the SFT stage (OUT_sft)")
    p.add_argument("overrides", nargs="*", help="section.key=value")

    p = add("train", cmd_train, "pre-train (or continue) a run; resumes from its run_dir")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--force", action="store_true", help="resume even if the config changed")

    p = add("info", cmd_info, "parameters, FLOPs and the MM1 peak lr of a model config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--seq-len", type=int, default=0)

    data = add("data", lambda a: None, "synthetic world, inspection and packing statistics")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = add("synth", cmd_data_synth, "write the synthetic world", dsub)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="tiny", choices=("tiny", "small", "medium"))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument(
        "--text-scale", type=float, default=1.0, help="text around images: 1 web-like, 0 compact"
    )
    p = add("inspect", cmd_data_inspect, "what a source holds: counts and decoded samples", dsub)
    p.add_argument("path")
    p.add_argument("--format", default=None)
    p.add_argument("-n", type=int, default=3)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json for token lengths")
    p = add("stats", cmd_data_stats, "mixture and packing statistics of a config", dsub)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--sequences", type=int, default=200)
    p.add_argument("--json", action="store_true")

    p = add("convert", cmd_convert, "export a run for inference, or write transformers checkpoints")
    p.add_argument("source", help="a run directory or an exported directory")
    p.add_argument("--export", default=None, help="write safetensors + config + tokenizer here")
    p.add_argument("--to-hf", default=None, help="transformers dir (LLaVA for mlp connectors)")
    p.add_argument(
        "--hf-type",
        default=None,
        choices=("llama", "qwen2", "mistral", "mixtral", "qwen3_moe"),
        help="default: llama for a dense decoder, the family a MoE one fits",
    )

    p = add("upcycle", cmd_upcycle, "a dense run or export -> a MoE export (sparse upcycling)")
    p.add_argument("source", help="a dense run directory or an exported directory")
    p.add_argument("--experts", type=int, required=True)
    p.add_argument("--every", type=int, default=1, help="experts in layers i: (i + 1) %% k == 0")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--noise", type=float, default=0.0, help="relative noise on the experts")
    p.add_argument("--seed", type=int, default=0, help="the router's random stream")
    p.add_argument("--out", required=True)

    p = add("eval", cmd_eval, "few-shot captioning / VQA evaluation with reports")
    p.add_argument("model", help="a run directory or an exported directory")
    p.add_argument(
        "--tasks", default=None, help="comma-separated names (default: the run's eval.tasks)"
    )
    p.add_argument("--task-file", default=None, help="YAML list of task specs (real data paths)")
    p.add_argument(
        "--world", default=None, help="synthetic world for synth_* (default: the run's own)"
    )
    # Unset flags keep the run's own eval settings (its config.yaml `eval` section).
    p.add_argument("--shots", default=None, help="e.g. 0,4,8 (eval.shots)")
    p.add_argument("--seeds", type=int, default=None, help="eval.seeds")
    p.add_argument("--beams", type=int, default=None, help="1 = greedy; 3 = OpenFlamingo's")
    p.add_argument(
        "--rices", action="store_true", help="eval.demo_selection=rices: nearest by image"
    )
    p.add_argument("--batch-size", type=int, default=None, help="eval.batch_size")
    p.add_argument("--max-examples", type=int, default=None, help="0 = every query")
    p.add_argument(
        "--shuffle-images", action="store_true", help="eval.shuffle_images: wrong-image control"
    )
    p.add_argument(
        "--bad-images",
        default=None,
        choices=("error", "empty"),
        help="eval.bad_images: an undecodable image stops (error, the default), or its "
        "queries score as empty predictions",
    )
    p.add_argument("--suite", default=None, help="sft (the world's SFT suite) or a suite file")
    p.add_argument("--suite-mode", default="auto", choices=("auto", "chat", "fewshot"))
    p.add_argument("--name", default=None)
    p.add_argument("--out", default=None, help=f"default: MODEL/{EVAL_OUT} (suite: eval-suite)")
    p.add_argument("overrides", nargs="*", help="eval.KEY=VALUE (e.g. eval.max_new_tokens=40)")

    p = add("generate", cmd_generate, "continue a prompt with images (`<image>` marks each)")
    p.add_argument("model", help="a run directory or an exported directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None)
    p.add_argument(
        "--chat",
        action="store_true",
        help="the prompt is a user turn, written by the model's chat template (as in SFT)",
    )

    p = add("chat", cmd_chat, "chat with a model in the terminal (/image PATH attaches images)")
    p.add_argument("model", help="a run directory or an exported directory")
    p.add_argument("--message", default=None, help="answer this one message, print, and exit")
    p.add_argument(
        "--image", action="append", default=[], help="with --message; at its <image> tags or first"
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="a built-in (plain, vicuna_v1, chatml, llama3), a .jinja file, or one of the "
        "tokenizer's named templates (default: the model's own, else plain)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
    p.add_argument("--device", default="cpu")

    p = add("serve", cmd_serve, "an OpenAI-compatible chat API and a chat page for a model")
    serve_arguments(p)

    p = add("ablate", cmd_ablate, "train and evaluate a grid of configs into a study's tables")
    p.add_argument("grid", help="the grid YAML (base config, axes or cells, seeds)")
    p.add_argument("--out", default=None, help="study directory (default: runs/ablations/STUDY)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their cost")
    p.add_argument("--jobs", type=int, default=1, help="cells in parallel, CPUs split between")
    p.add_argument("--force", action="store_true", help="run in a study dir of another grid")

    p = add("recaption", cmd_recaption, "caption WebDataset shards with a trained model")
    p.add_argument("checkpoint", help="a run directory or an exported directory")
    p.add_argument("--in", dest="inputs", required=True, help="a folder of .tar shards or a glob")
    p.add_argument("--out", required=True, help="folder for the new shards (same names)")
    p.add_argument("--fuse", action="store_true", help="caption = generated + original alt-text")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p = add(
        "caption-splits",
        cmd_data_caption_splits,
        "clean-caption splits of a world's alt-text images (re-captioning study)",
        dsub,
    )
    p.add_argument("world")
    p.add_argument("--fraction", type=float, default=0.05, help="share in the clean subset")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`mm1 data stats cfg.yaml --json data.seq_len=4096`).
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from mm1.data.sources import DataError

    try:
        code = args.fn(args)
    except ConfigError as err:
        _print_error("config error", err)
        return 2
    except (FileNotFoundError, DataError) as err:
        _print_error("error", err)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _print_error("error", err)  # a full disk is the user's to fix: no traceback
        return 1
    except (ValueError, KeyError, TypeError) as err:
        # Mostly input the checks above did not classify (a task file's contents, a prompt):
        # one line for the user; the traceback on request, for a bug report.
        if os.environ.get("MM1_TRACEBACK"):
            raise
        _print_error("error", err.args[0] if isinstance(err, KeyError) and err.args else err)
        console.print("(MM1_TRACEBACK=1 shows the traceback)", style="dim")
        return 1
    return code or 0


def _print_error(label: str, err: object) -> None:
    # One line however long (no wrapping at the console width); the message is plain text, so
    # brackets in it (paths, lists) must not be read as rich markup.
    console.print(f"[bold red]{label}:[/] {escape(str(err))}", soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
