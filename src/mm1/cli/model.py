"""Using a trained model: `mm1 convert`, `mm1 upcycle`, `mm1 generate`, `mm1 chat`, `mm1 serve`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mm1.config import ConfigError
from mm1.inference_options import TEMPLATE_KWARGS_HELP, add_runtime_arguments, template_kwargs
from mm1.serve import add_arguments as serve_arguments

from .common import MODEL_HELP, Add, add_image_sampling_arguments, console, image_sampling

if TYPE_CHECKING:
    from PIL import Image

    from mm1.data.tokenizer import Tokenizer


def cmd_convert(args: argparse.Namespace) -> None:
    from mm1.pretrained import check_output_dir, load_pretrained, save_pretrained

    if not args.export and not args.to_hf:
        raise ConfigError("convert: give --export DIR and/or --to-hf DIR")
    # Refused before the model loads: a write there would clobber or shadow something else.
    if args.export:
        check_output_dir(args.export, "--export", "export", args.source)
    if args.to_hf:
        check_output_dir(args.to_hf, "--to-hf", "hf", args.source)
    if args.export and args.to_hf and Path(args.export).resolve() == Path(args.to_hf).resolve():
        raise ConfigError(
            f"--export and --to-hf are both {args.export}: both write model.safetensors; give "
            "two directories"
        )
    p = load_pretrained(args.source, dtype=args.dtype)  # written in the dtype it is read in
    if args.export:
        out = save_pretrained(p.model, p.tokenizer, p.processor, args.export, p.prompt_format)
        console.print(f"exported {args.source} -> {out}")
    if args.to_hf:
        from mm1.hf_export import save_hf
        from mm1.pretrained import writing_export

        try:
            with writing_export(Path(args.to_hf)):
                console.print(save_hf(p, args.to_hf, args.hf_type)[1])
        except ValueError as err:  # what transformers cannot express: said, not a bug
            why = str(err)
            raise ConfigError(why if why.startswith("--to-hf") else f"--to-hf: {why}") from None


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
    import jinja2

    from mm1.chat import check_sampling
    from mm1.data.tokenizer import IMAGE_TOKEN, tokenize_chat_prompt, tokenize_prompt
    from mm1.models.generation import check_prompt_fits, generate
    from mm1.pretrained import load_pretrained

    # the same checks as `mm1 chat`, before the model loads
    check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.stop or ())
    kwargs = template_kwargs(args.chat_template_kwargs)
    if kwargs and not args.chat:
        raise ConfigError("--chat-template-kwargs goes with --chat (the prompt as a user turn)")
    tags, n = args.prompt.count(IMAGE_TOKEN), len(args.image or [])
    if tags != n:
        raise ConfigError(
            f"--prompt has {tags} {IMAGE_TOKEN} tag(s) but {n} --image given: put one "
            f"{IMAGE_TOKEN} where each image goes, e.g. --prompt '{IMAGE_TOKEN}Output:'"
        )
    p = load_pretrained(args.model, args.device, args.dtype)
    images = _load_images(args.image)
    # Written as the model was trained: its image slots, boundaries and chat template.
    fmt = p.prompt_format
    if args.chat:
        user = [{"role": "user", "content": args.prompt}]
        try:
            ids = tokenize_chat_prompt(user, images, p.tokenizer, fmt, kwargs)
        except jinja2.TemplateError as err:  # as chat and serve say it
            where = "--chat-template-kwargs" if kwargs else "--chat"
            raise ConfigError(f"{where}: the chat template failed: {err}") from None
    else:
        ids = tokenize_prompt(args.prompt, images, p.tokenizer, fmt)
    # a prompt past the context is refused, as serve refuses it; the answer stops at it
    room = check_prompt_fits(len(ids), p.model.cfg.decoder.max_seq_len)
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
        max_new_tokens=min(args.max_new_tokens, room),
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


def cmd_generate_image(args: argparse.Namespace) -> None:
    from PIL import Image

    from mm1.eval.image_generation import generate_images
    from mm1.pretrained import load_pretrained

    sampling, guidance_scale = image_sampling(args)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: a .png file (the images side by side)")
    p = load_pretrained(args.model, args.device, args.dtype)
    images = generate_images(p, args.prompt, args.n, sampling, args.seed, guidance_scale)
    strip = (images.permute(2, 0, 3, 1).flatten(1, 2) * 255).round().byte().numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip).save(out)
    console.print(f"wrote {out} ({args.n} image(s) of {images.shape[-1]} px)")


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
    settings = ChatSettings(
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.seed,
        compile=args.compile,
        template_kwargs=template_kwargs(args.chat_template_kwargs),
        hide_reasoning=args.hide_reasoning,
    )
    settings.validate()
    # A script's mistakes (a missing image, a tag count) are reported before the model loads.
    images = None if args.message is None else message_images(args.message, args.image)
    p = load_pretrained(args.model, args.device, args.dtype)
    template = resolve_chat_template(p.tokenizer, args.chat_template)
    if template.notice:
        print(f"note: {template.notice}", file=sys.stderr)
    session = ChatSession(p, template, settings)
    if images is None:
        run_interactive(session)
        return None
    return 130 if answer_once(session, args.message, images).stopped else None


def cmd_serve(args: argparse.Namespace) -> int | None:
    from mm1.serve import run

    return run(args)


def register(add: Add) -> None:
    p = add("convert", cmd_convert, "export a run for inference, or write transformers checkpoints")
    p.add_argument("source", help=MODEL_HELP)
    p.add_argument("--export", default=None, help="write safetensors + config + tokenizer here")
    p.add_argument("--to-hf", default=None, help="transformers dir (LLaVA for mlp connectors)")
    p.add_argument(
        "--hf-type",
        default=None,
        choices=(
            "llama",
            "qwen2",
            "qwen3",
            "mistral",
            "persimmon",
            "mixtral",
            "qwen3_moe",
            "mm1_moe",
        ),
        help="default for a dense decoder: persimmon with LayerNorm (Fuyu-8B's), qwen3 with a "
        "q/k norm, qwen2 with q/k/v biases, mistral with a sliding window, else llama; for a MoE "
        "one the family it fits, else mm1_moe",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help="the weights' precision in what is written: float32 (default, as trained), "
        "bfloat16 (bf16; half the size, as llava-hf publishes) or float16 (fp16); a frozen "
        "image tokenizer stays float32",
    )

    p = add("upcycle", cmd_upcycle, "a dense run or export -> a MoE export (sparse upcycling)")
    p.add_argument("source", help=f"dense: {MODEL_HELP}")
    p.add_argument("--experts", type=int, required=True)
    p.add_argument("--every", type=int, default=1, help="experts in layers i: (i + 1) %% k == 0")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--noise", type=float, default=0.0, help="relative noise on the experts")
    p.add_argument("--seed", type=int, default=0, help="the router's random stream")
    p.add_argument("--out", required=True)

    p = add("generate", cmd_generate, "continue a prompt with images (`<image>` marks each)")
    p.add_argument("model", help=MODEL_HELP)
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
    p.add_argument("--chat-template-kwargs", default=None, help=TEMPLATE_KWARGS_HELP)
    add_runtime_arguments(p)

    p = add("generate-image", cmd_generate_image, "draw images of a caption (a chameleon model)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="the caption, as training writes one")
    p.add_argument("--out", required=True, help="a .png: the images side by side")
    p.add_argument("--n", type=int, default=1, help="images to draw (greedy: n equal images)")
    add_image_sampling_arguments(p, "")
    add_runtime_arguments(p)

    p = add("chat", cmd_chat, "chat with a model in the terminal (/image PATH attaches images)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--message", default=None, help="answer this one message, print, and exit")
    p.add_argument(
        "--image", action="append", default=[], help="with --message; at its <image> tags or first"
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="a built-in (plain, vicuna_v1 or its alias llava_v1, chatml, llama3), a .jinja file, or one of the "
        "tokenizer's named templates (default: the model's own, else plain)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
    p.add_argument("--chat-template-kwargs", default=None, help=TEMPLATE_KWARGS_HELP)
    p.add_argument(
        "--hide-reasoning",
        action="store_true",
        help="print only the answer after a reasoning block (<think>...</think>); by default "
        "the block is shown between 'Thinking...' and '...done thinking.'",
    )
    add_runtime_arguments(p)
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step at fixed shapes (a CUDA graph per step on GPU): the first "
        "answer waits for the compilation",
    )

    p = add("serve", cmd_serve, "an OpenAI-compatible chat API and a chat page for a model")
    serve_arguments(p)
