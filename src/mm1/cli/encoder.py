"""`mm1 train-encoder`, `mm1 eval-encoder` and `mm1 export-encoder`: image-encoder pre-training
(CLIP / AIM, or a VQ / SEED image tokenizer), its evaluation, and its ViT for transformers."""

from __future__ import annotations

import argparse

from mm1.inference_options import add_runtime_arguments

from .common import RESHARD_HELP, Add, console, first_rank, skipped_note


def cmd_train_encoder(args: argparse.Namespace) -> int | None:
    from mm1.config.encoder import load_encoder_config
    from mm1.train.encoder_trainer import train_encoder

    cfg = load_encoder_config(args.config, args.overrides)
    result = train_encoder(cfg, force=args.force, reshard=args.reshard)
    if result["stopped_by"]:
        if first_rank():
            console.print(
                f"stopped early at step {result['step']} of {cfg.train.steps} (checkpoint saved "
                f"in {cfg.train.run_dir}); run the same command to resume"
            )
        return 128 + result["stopped_by"]
    if first_rank():
        console.print(
            f"done: step {result['step']}, loss {result['loss']:.4f} -> {cfg.train.run_dir}"
            + skipped_note(result)
        )
    return None


def cmd_export_encoder(args: argparse.Namespace) -> None:
    from mm1.encoder_export import export_encoder_hf

    out = export_encoder_hf(args.run, args.out)
    console.print(f"wrote {out} (transformers CLIPVisionModel / SiglipVisionModel layout)")


def cmd_eval_encoder(args: argparse.Namespace) -> None:
    from mm1.config import ConfigError
    from mm1.eval.encoders import evaluate_encoder_run

    if args.probe_seeds < 1:  # before the model loads
        raise ConfigError(f"--probe-seeds {args.probe_seeds} must be >= 1 (linear-probe splits)")
    seeds = tuple(range(args.probe_seeds))
    result, out = evaluate_encoder_run(
        args.run, args.world, args.out, args.untrained_seed, seeds, args.device, args.dtype
    )
    zs = result.get("zero_shot")
    if zs:
        line = ", ".join(
            f"{k} {v['accuracy']:.3f} (chance {v['chance']:.3f})" for k, v in zs.items()
        )
        console.print(f"zero-shot: {line}")
        r = result["retrieval"]
        console.print(
            f"retrieval text->image R@1 {r['text_to_image_r1']:.3f} (chance "
            f"{r['text_to_image_r1_chance']:.3f}), image->text R@1 {r['image_to_text_r1']:.3f}"
        )
    rec = result.get("reconstruction")
    if rec:
        console.print(
            f"reconstruction mse {rec['mse']:.4f}, PSNR {rec['psnr']:.2f} dB, "
            f"{rec['codes_used']} of {rec['codebook_size']} codes used"
        )
    seed = result.get("seed")
    if seed:
        console.print(
            f"through the codes: causal cosine {seed['causal_cosine']:.3f}, generation cosine "
            f"{seed['generation_cosine']:.3f}, R@1 {seed['generation_r1']:.3f} (chance "
            f"{seed['generation_r1_chance']:.3f}), {seed['codes_used']:.1%} of the codes used"
        )
    console.print(f"linear probe mean accuracy {result['linear_probe']['mean']['accuracy']:.3f}")
    console.print(f"wrote {out}")


def register(add: Add) -> None:
    p = add(
        "train-encoder",
        cmd_train_encoder,
        "pre-train an image encoder (encoder.objective: clip | aim | vq | seed); resumes",
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument(
        "--force",
        action="store_true",
        help="resume even if the config or a data source's files changed",
    )
    p.add_argument("--reshard", action="store_true", help=RESHARD_HELP)

    p = add(
        "export-encoder",
        cmd_export_encoder,
        "write an encoder run's ViT as a transformers CLIPVisionModel directory",
    )
    p.add_argument("run", help="an encoder run directory (or one of its checkpoints)")
    p.add_argument("out", help="the directory to write")

    p = add(
        "eval-encoder",
        cmd_eval_encoder,
        "score an encoder run on the world's held-out scenes: zero-shot, retrieval, linear probe",
    )
    p.add_argument("run", help="an encoder run directory (or one of its checkpoints)")
    p.add_argument("--world", default=None, help="the synthetic world (default: the run's)")
    p.add_argument(
        "--out", default=None, help="output directory (default: RUN/eval; RUN/eval/step_N)"
    )
    p.add_argument(
        "--untrained-seed",
        type=int,
        default=None,
        help="score a freshly initialised encoder of the run's architecture (a baseline)",
    )
    p.add_argument("--probe-seeds", type=int, default=3, help="linear-probe train/test splits")
    add_runtime_arguments(p, read_into=False)
