"""`mm1 eval`: few-shot evaluation of a run or an export, or an evaluation suite (`--suite`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mm1.config import ConfigError, EvalConfig
from mm1.inference_options import add_runtime_arguments

from .common import (
    MODEL_HELP,
    Add,
    add_image_sampling_arguments,
    console,
    image_sampling,
    refuse_torchrun,
)

# `mm1 eval`'s own folder: `eval/` holds the demo's evaluation, which its report links to.
EVAL_OUT = "eval-cli"
SUITE_OUT = "eval-suite"  # `mm1 eval --suite`'s (run_suite's default)


def cmd_eval(args: argparse.Namespace) -> None:
    from mm1.checkpoint import refuse_encoder_run

    # first: an encoder run would otherwise get an output folder and fail only on loading
    refuse_encoder_run(args.model)
    if args.suite:
        refuse_torchrun("mm1 eval --suite")  # few-shot eval alone shares its batches
        return cmd_eval_suite(args)
    if args.suite_mode is not None:
        raise ConfigError("--suite-mode applies only with --suite (sft or a suite file)")
    from mm1.config import to_dict
    from mm1.data.world import run_world
    from mm1.eval.fewshot import check_shots, evaluate
    from mm1.eval.ranks import join_ranks
    from mm1.eval.report import write_report
    from mm1.eval.tasks import SYNTHETIC_TASKS, TASKS, load_tasks, register_task_file
    from mm1.pretrained import check_runtime, load_pretrained, locate_model

    model_dir = Path(args.model)
    locate_model(model_dir)  # a mistyped path is said as such, not as a missing world
    check_runtime(args.device, args.dtype)
    e, settings = _eval_settings(_run_of(model_dir), args)
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
    world = args.world or run_world(model_dir)
    synthetic = [t for t in tasks if t in SYNTHETIC_TASKS]
    if synthetic and not (Path(world) / "world.json").is_file():
        raise ConfigError(
            f"{', '.join(synthetic)} need the synthetic world the model was trained on; none at "
            f"{world}: pass --world DIR, or evaluate your own tasks with --task-file"
        )
    out = Path(args.out or _default_out(model_dir, EVAL_OUT))
    _check_writable(out, args.out is not None)
    # The tasks load before the model: a mistake in their files, or more shots than their
    # support splits hold, is said at once, naming the option that asked for them.
    loaded = load_tasks(tasks, world=world)
    given = f"--shots {args.shots}" if args.shots is not None else f"eval.shots={list(shots)}"
    check_shots(loaded, shots, e.max_examples or None, given)
    ranks, device = join_ranks(args.device)  # under torchrun: each rank a share of the batches
    p = load_pretrained(model_dir, device, args.dtype)
    results = evaluate(
        p.model,
        p.tokenizer,
        p.processor,
        e,
        tasks=loaded,
        world=world,
        prompt_format=p.prompt_format,  # prompts written as the model was trained
        name=args.name or _model_name(model_dir),
        ranks=ranks,
    )
    if not ranks.is_main:
        return None  # the same results on every rank: the first writes them
    results["settings"] = {**settings, "eval": {**to_dict(e), "tasks": tasks}}
    results["settings"]["runtime"] = {**p.runtime, "processes": ranks.world}
    files = write_report(results, out)
    console.print(Path(files["markdown"]).read_text().split("\n\n###")[0], markup=False)
    console.print(f"results: {files['json']}  table: {files['markdown']}  plot: {files['plot']}")


def cmd_eval_suite(args: argparse.Namespace) -> None:
    from mm1.data.world import run_world
    from mm1.eval.suite import run_suite
    from mm1.pretrained import check_runtime, load_pretrained, locate_model

    _check_suite_args(args)  # before anything loads: the suite takes few of eval's options
    locate_model(args.model)
    check_runtime(args.device, args.dtype)
    world = args.world or run_world(Path(args.model))
    s = args.seeds if args.seeds is not None else 3
    kw = {"mode": args.suite_mode or "auto", "seeds": s, "max_examples": args.max_examples or 0}
    kw["shuffle_images"] = args.shuffle_images
    kw["compile"] = args.compile
    if args.batch_size is not None:
        kw["batch_size"] = args.batch_size
    model = Path(args.model)
    # One folder per suite and control, so a second run does not replace the first's results.
    folder = SUITE_OUT if args.suite == "sft" else f"{SUITE_OUT}-{Path(args.suite).stem}"
    folder += "-shuffled" if args.shuffle_images else ""
    out = Path(args.out or _default_out(model, folder))
    _check_writable(out, args.out is not None)
    p = load_pretrained(model, args.device, args.dtype)
    name = args.name or _model_name(model)
    if args.shuffle_images and not args.name:
        name += " (shuffled images)"
    r = run_suite(p, _run_of(model), args.suite, world=world, name=name, out=out, **kw)
    console.print(Path(r["files"]["markdown"]).read_text().split("\n\n## ")[0], markup=False)
    console.print(f"results: {r['files']['json']}  plot: {r['files']['plot']}")


def cmd_eval_generation(args: argparse.Namespace) -> None:
    from mm1.checkpoint import refuse_encoder_run
    from mm1.data.world import run_world
    from mm1.eval.image_generation import (
        coco_captioned_images,
        evaluate_image_generation,
        scored_pairs,
        world_captioned_images,
        write_results,
    )
    from mm1.pretrained import check_runtime, load_pretrained, locate_model

    refuse_encoder_run(args.model)
    if (args.captions is None) != (args.image_dir is None):
        raise ConfigError("--captions and --image-dir go together (a COCO captions file)")
    if args.max_images < 0 or args.max_images == 1:
        raise ConfigError(f"--max-images {args.max_images}: 0 (all) or at least 2")
    sampling, guidance_scale = image_sampling(args)
    model_dir = Path(args.model)
    locate_model(model_dir)
    check_runtime(args.device, args.dtype)
    if args.captions is not None:
        from mm1.eval.tasks import WrongFileError

        try:
            images = coco_captioned_images(args.captions, args.image_dir)
        except WrongFileError as err:  # e.g. a VQA questions file: the option's mistake
            raise ConfigError(f"--captions: {err}") from None
        source = f"{args.captions} ({args.image_dir})"
    else:
        world = Path(args.world or run_world(model_dir))
        if not (world / "world.json").is_file():
            raise ConfigError(
                f"no synthetic world at {world}: pass --world DIR, or --captions FILE "
                "--image-dir DIR (COCO captions) for your own images"
            )
        images, source = world_captioned_images(world), f"the world at {world} (held out)"
    images = scored_pairs(images, args.max_images)
    out = Path(args.out or _default_out(model_dir, EVAL_OUT))
    _check_writable(out, args.out is not None)
    p = load_pretrained(model_dir, args.device, args.dtype)
    result = evaluate_image_generation(
        p, images, args.batch_size, sampling, args.seed, guidance_scale
    )
    result["source"] = source
    result["runtime"] = p.runtime
    path = write_results(result, out, f"Image generation: {_model_name(model_dir)}")
    r = result["text_to_image"]
    console.print(
        f"text -> image R@1 {r['text_to_image_r1']:.3f} (chance "
        f"{r['text_to_image_r1_chance']:.3f}), R@5 {r['text_to_image_r5']:.3f}; cosine own "
        f"{result['cosine_own']:.3f} vs others {result['cosine_others']:.3f}"
    )
    console.print(f"results: {path}")


def _run_of(model: Path) -> Path:
    """Where a model's config.yaml is: a checkpoint's (`RUN/checkpoints/step_N`) is its run's."""
    from mm1.checkpoint import is_checkpoint

    return model.parent.parent if is_checkpoint(model) else model


def _default_out(model: Path, folder: str) -> Path:
    """A run's results in the run (`RUN/FOLDER`); a checkpoint's in its run
    (`RUN/FOLDER/step_N`), since the checkpoint itself is deleted once newer ones replace it;
    an export's, or a transformers directory's (LLaVA, Fuyu), in `runs/FOLDER/NAME-HASH` here
    (HASH of its resolved path, so two exports named alike do not share a folder), since such
    a model is one to hand on (to a hub, to `mm1 serve`) and may be read-only (a hub cache)."""
    import hashlib

    from mm1.checkpoint import is_export

    run = _run_of(model)
    if run != model:
        return run / folder / model.name
    if not is_export(model) and not (model / "config.json").is_file():
        return model / folder
    real = model.resolve()
    tag = hashlib.blake2b(str(real).encode(), digest_size=4).hexdigest()
    out = Path("runs") / folder / f"{real.name}-{tag}"
    if out.resolve().is_relative_to(real):
        raise ConfigError(
            f"{model} is {'an export' if is_export(model) else 'a transformers model'} and the "
            "current directory is inside it: pass --out DIR, so the results do not go into it"
        )
    return out


def _model_name(model: Path) -> str:
    run = _run_of(model)
    name = model.resolve().name  # `.` has no name of its own
    return f"{run.resolve().name}/{name}" if run != model else name


# What `--suite` takes; every other flag of `mm1 eval` configures the few-shot evaluation.
SUITE_FLAGS = "--suite-mode, --seeds, --max-examples, --batch-size, --shuffle-images, --compile, "
SUITE_FLAGS += "--world, --name, --out, --device, --dtype"


def _check_suite_args(args: argparse.Namespace) -> None:
    """The suite fixes its own prompts, shots and decoding: a flag or override it would ignore
    is refused (one line naming it) rather than silently dropped; the ones it takes are
    checked as plain `mm1 eval` checks them."""
    if args.suite != "sft" and not Path(args.suite).exists():
        raise ConfigError(
            f"--suite {args.suite}: no such suite file (the synthetic world's suite is --suite sft)"
        )
    ignored = {
        "--shots": args.shots is not None,
        "--beams": args.beams is not None,
        "--tasks": bool(args.tasks),
        "--task-file": args.task_file is not None,
        "--bad-images": args.bad_images is not None,
        "--rices": args.rices,
    }
    for flag, given in ignored.items():
        if given:
            raise ConfigError(
                f"{flag} does not apply to --suite (the suite fixes its tasks, prompts and "
                f"greedy decoding); --suite takes {SUITE_FLAGS}"
            )
    if args.overrides:
        raise ConfigError(
            f"{args.overrides[0]}: --suite takes no eval.* overrides (the suite fixes its "
            f"tasks, prompts and greedy decoding); it takes {SUITE_FLAGS}"
        )
    for flag, value, low in (
        ("--seeds", args.seeds, 1),
        ("--batch-size", args.batch_size, 1),
        ("--max-examples", args.max_examples, 0),
    ):
        if value is not None and value < low:
            zero = " (0 = every query)" if low == 0 else ""
            raise ConfigError(f"{flag} {value} must be >= {low}{zero}")


def _check_writable(out: Path, given: bool) -> None:
    """Fail before the model loads and every task is scored (minutes), not when the results
    are written: the output directory is created if need be and a file written into it."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        why = "a file, not a directory" if out.is_file() else err.strerror or str(err)
        fix = "give a directory you can write to" if given else "pass --out DIR to write elsewhere"
        where = f"--out {out}" if given else f"the results directory {out}"
        raise ConfigError(f"{where}: cannot write there ({why}): {fix}") from None


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
    if args.compile:
        flags["compile"] = True
    e = replace(e, **flags)  # type: ignore[arg-type]
    validate_eval(e)
    source = str(saved) if saved.is_file() else f"defaults (no config.yaml in {model_dir})"
    return e, {"from": source, "overrides": list(args.overrides), "flags": flags}


def register(add: Add) -> None:
    p = add("eval", cmd_eval, "few-shot captioning / VQA evaluation with reports")
    p.add_argument("model", help=MODEL_HELP)
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
        "--compile",
        action="store_true",
        help="eval.compile: greedy decoding's steps compiled at fixed shapes (CUDA graphs on GPU)",
    )
    p.add_argument(
        "--bad-images",
        default=None,
        choices=("error", "empty"),
        help="eval.bad_images: an undecodable image stops (error, the default), or its "
        "queries score as empty predictions",
    )
    p.add_argument("--suite", default=None, help="sft (the world's SFT suite) or a suite file")
    p.add_argument(
        "--suite-mode",
        default=None,  # unset, so that one given without --suite can be refused
        choices=("auto", "chat", "fewshot"),
        help="with --suite: how to prompt (default auto: chat for a fine-tuned model)",
    )
    p.add_argument("--name", default=None)
    p.add_argument(
        "--out",
        default=None,
        help=f"default: MODEL/{EVAL_OUT} (suite: eval-suite[-NAME][-shuffled])",
    )
    add_runtime_arguments(p)
    p.add_argument("overrides", nargs="*", help="eval.KEY=VALUE (e.g. eval.max_new_tokens=40)")

    p = add(
        "eval-generation",
        cmd_eval_generation,
        "text-to-image scores of an emu2, chameleon or seed model: each caption's generated image "
        "(emu2: its features; chameleon, seed: its codes) retrieves its own among the others",
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--world", default=None, help="synthetic world (default: the run's own)")
    p.add_argument("--captions", default=None, help="a COCO captions file (your own images)")
    p.add_argument("--image-dir", default=None, help="the images of --captions")
    p.add_argument("--max-images", type=int, default=0, help="the first N images (0: all)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="captions generated at once (twice as many rows with --guidance-scale)",
    )
    add_image_sampling_arguments(p, "chameleon, seed")
    p.add_argument("--out", default=None, help=f"default: MODEL/{EVAL_OUT}")
    add_runtime_arguments(p)
