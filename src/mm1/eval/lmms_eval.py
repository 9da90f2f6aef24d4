"""An lmms-eval (0.7.x) model backend for mm1 models: `--model mm1 --model_args pretrained=DIR`.

`DIR` is anything `mm1.pretrained.load_pretrained` reads (an exported directory or a run
directory). lmms-eval finds the backend through the `lmms_eval.models` entry-point group, whose
payload is `manifest` below (a callable returning a `ModelManifest`):

    [project.entry-points."lmms_eval.models"]
    mm1 = "mm1.eval.lmms_eval:manifest"

Or pass an instance to `lmms_eval.evaluator.simple_evaluate(model=MM1LMM(pretrained=DIR), ...)`.

Prompts: lmms-eval hands a context string and the document's visuals. When the context holds
`<image>` tags there must be one per visual; otherwise one `<image>` per visual is put in front of
the context (OpenFlamingo-style, the way mm1 models see images in pre-training). The text is then
tokenized through the model's prompt format like training documents (BOS, `<image>` -> the
image's slots, with `<img>` … `</img>` when the model was trained so); with `chat=true` the
context is a user turn written by the model's chat template with its generation prompt (for
models fine-tuned on conversations).

Model arguments (`--model_args key=value,...`): `pretrained` (required), `device` (default cuda
when available), `batch_size`, `max_new_tokens` (default 32, when a task's generation_kwargs do
not set one), `num_beams` (default 1 = greedy), `image_boundaries` (default: as the model was trained,
from its prompt_format.json; true wraps image slots in `<img>` … `</img>`), `chat` (default
false), `dtype` (float32, bfloat16, float16; the weights are read straight into it),
`compile` (default false; true compiles the decode step at fixed shapes, one CUDA graph per
step on a GPU, for greedy or sampled decoding).

Only images are handled (no video or audio). This module imports lmms_eval, so import it only
where lmms-eval is installed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from mm1.data.tokenizer import IMAGE_TOKEN, tokenize_chat_prompt, tokenize_prompt
from mm1.eval.ranks import rank_device
from mm1.models.generation import generate, generate_beam
from mm1.pretrained import check_device, check_dtype, load_pretrained
from mm1.reasoning import empty_block, format_reasoning, split_reasoning

MODEL_ID = "mm1"
_MAX_ROUNDS = 32


def manifest() -> Any:
    """The entry-point payload lmms-eval's registry loads (group `lmms_eval.models`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.MM1LMM")


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y", "on")
    return bool(value)


def _flatten_visuals(visuals: Any) -> list[Image.Image]:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    out: list[Image.Image] = []
    for v in visuals:
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            out += _flatten_visuals(v)
        elif isinstance(v, Image.Image):
            out.append(v)
        else:
            raise TypeError(
                f"MM1LMM handles images only; got a visual of type {type(v).__name__} ({v!r:.80})"
            )
    return out


class LoglikelihoodResult(GenerationResult):
    """A `(loss, is_greedy)` pair that unpacks like a tuple.

    lmms-eval 0.7.3's evaluator passes every model output through `unwrap_generation_output`,
    which turns a plain `(float, bool)` tuple into its string and breaks `multiple_choice` tasks
    ("too many values to unpack"); a `GenerationResult` carrying the tuple as its `text` comes
    out as the tuple itself.
    """

    def __init__(self, loss: float, greedy: bool) -> None:
        super().__init__(text=(loss, greedy))  # type: ignore[arg-type]

    def __iter__(self) -> Any:
        return iter(self.text)

    def __getitem__(self, i: int) -> Any:
        return self.text[i]

    def __len__(self) -> int:
        return 2


class MM1LMM(lmms):
    """lmms-eval backend for a trained or exported mm1 model."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | str = 32,
        num_beams: int | str = 1,
        image_boundaries: bool | str | None = None,
        chat: bool | str = False,
        dtype: str = "float32",
        compile: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        kwargs.pop("max_batch_size", None)  # lmms-eval passes it; batches here are fixed-size
        if kwargs:
            raise ValueError(f"MM1LMM: unknown model_args {sorted(kwargs)}")
        # under torchrun / accelerate (lmms-eval shares the requests out): this rank's GPU
        device = rank_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # read straight into `dtype` (the rotary frequencies kept in fp32, as transformers does)
        check_device(device, "device")  # errors name the model argument
        loaded = load_pretrained(pretrained, device, check_dtype(dtype, device, "dtype"))
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.processor = loaded.processor
        self._device = torch.device(device)
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self.max_new_tokens = int(max_new_tokens)
        self.num_beams = int(num_beams)
        # As the model was trained (its prompt_format.json), unless overridden here.
        self.prompt_format = loaded.prompt_format
        if image_boundaries is not None:
            boundaries = _as_bool(image_boundaries)
            self.prompt_format = replace(self.prompt_format, image_boundaries=boundaries)
        self.chat = _as_bool(chat)
        # Chat answers of a template that writes reasoning blocks: the text after the block.
        self.reasoning = format_reasoning(self.tokenizer, self.prompt_format) if self.chat else None
        # The decode step compiled at fixed shapes (a CUDA graph per step on a GPU): worth its
        # compile time over a whole benchmark; greedy and sampled decoding, not beam search.
        self.compile = _as_bool(compile)
        if self.compile and self.num_beams > 1:
            raise ValueError("MM1LMM: compile=true compiles greedy / sampled decoding: num_beams=1")
        self.stop_ids = sorted({self.tokenizer.eos_id, self.tokenizer.endofchunk_id})

    @property
    def image_boundaries(self) -> bool:
        return self.prompt_format.image_boundaries

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # -- prompts --------------------------------------------------------------------------------

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def prompt(self, context: str, visuals: Any) -> tuple[list[int], torch.Tensor | None]:
        """Token ids (image slots expanded) and pixel values (every crop) of one request."""
        ids, pixels, _ = self._request(context, visuals)
        return ids, pixels

    def _request(
        self, context: str, visuals: Any
    ) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """`prompt`, and the images' sizes (height, width; the anyres layout needs them)."""
        images = _flatten_visuals(visuals)
        tags = context.count(IMAGE_TOKEN)
        if tags == 0:
            context = IMAGE_TOKEN * len(images) + context
        elif tags != len(images):
            raise ValueError(f"the context has {tags} {IMAGE_TOKEN} tags but {len(images)} images")
        fmt = self.prompt_format
        if self.chat:
            user = [{"role": "user", "content": context}]
            ids = tokenize_chat_prompt(user, images, self.tokenizer, fmt)
        else:
            ids = tokenize_prompt(context, images, self.tokenizer, fmt)
        if not images:
            return ids, None, None
        weight = next(self.model.parameters())  # where (and how) the model computes
        pixels = fmt.pixel_values(self.processor, images)
        pixels = pixels.to(device=weight.device, dtype=weight.dtype)
        return ids, pixels, fmt.image_info(images)[1]

    # -- generation -----------------------------------------------------------------------------

    def _generate(
        self,
        prompts: Sequence[tuple[list[int], torch.Tensor | None, torch.Tensor | None]],
        gen_kwargs: dict[str, Any],
    ) -> list[str]:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_new = int(kwargs.get("max_new_tokens") or self.max_new_tokens)
        temperature = float(kwargs.get("temperature") or 0.0)
        do_sample = _as_bool(kwargs.get("do_sample", False)) and temperature > 0
        num_beams = int(kwargs.get("num_beams") or self.num_beams)
        pixels = [p for _, p, _ in prompts if p is not None]
        pixel_values = torch.cat(pixels) if pixels else None
        sizes = [s for _, _, s in prompts if s is not None]
        ids = [i for i, _, _ in prompts]
        common = {
            "image_sizes": torch.cat(sizes) if sizes else None,
            "max_new_tokens": max_new,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.tokenizer.pad_id,
            "stop_strings": list(until),
            "tokenizer": self.tokenizer,
        }
        if num_beams > 1 and not do_sample:
            if self.compile:
                raise ValueError("MM1LMM: compile=true does not run beam search (num_beams > 1)")
            outs = generate_beam(self.model, ids, pixel_values, num_beams=num_beams, **common)
        else:
            outs = generate(
                self.model,
                ids,
                pixel_values,
                do_sample=do_sample,
                temperature=temperature or 1.0,
                top_p=float(kwargs.get("top_p") or 1.0),
                compile=self.compile,
                **common,
            )
        texts = []
        for out in outs:
            end = next((i for i, t in enumerate(out) if t in self.stop_ids), len(out))
            text = self.tokenizer.decode(out[:end])
            if self.reasoning is not None:
                text = split_reasoning(text, opened=self.reasoning)[1]
            for stop in until:
                if stop:
                    text = text.split(stop, 1)[0]
            texts.append(text)
        return texts

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            key = json.dumps(req.args[1] or {}, sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="mm1 generating")
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                prompts = []
                for i in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    prompts.append(
                        self._request(context, doc_to_visual(self._doc(task, split, doc_id)))
                    )
                gen_kwargs = requests[batch[0]].args[1]
                for i, text in zip(batch, self._generate(prompts, gen_kwargs)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
                pbar.update(len(batch))
        pbar.close()
        return [r if r is not None else "" for r in results]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[tuple[str, ...]]:
        """Rounds run one after another per request: round 0 answers the context; later rounds
        take their visuals and context from the task's `doc_to_text(doc, previous_output=...,
        round_idx=..., previous_round_info=...)`, which ends the dialogue by returning a true
        terminal flag (lmms-eval's multi-round protocol)."""
        results = []
        for req in tqdm(requests, disable=self.rank != 0, desc="mm1 multi-round"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            visuals = doc_to_visual(doc)
            outputs: list[str] = []
            info = None
            for round_idx in range(_MAX_ROUNDS):
                if round_idx:
                    visuals, context, terminal, outputs, info = doc_to_text(
                        doc,
                        previous_output=list(outputs),
                        round_idx=round_idx,
                        previous_round_info=info,
                    )
                    outputs = list(outputs)
                    if terminal:
                        break
                outputs.append(
                    self._generate([self._request(context, visuals)], gen_kwargs)[0].strip()
                )
            results.append(tuple(outputs))
        return results

    # -- scoring --------------------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[LoglikelihoodResult]:
        """Per request `(loss, is_greedy)`: the mean negative log-likelihood per continuation
        token given the context and images, and whether greedy decoding would produce the
        continuation.

        The loss (not a log-probability) is what lmms-eval's models return (LLaVA, Qwen-VL, ...)
        and what its `multiple_choice` scoring expects: it picks the choice with the smallest
        value. As lm-evaluation-harness, trailing spaces of the context move to the continuation,
        the whole text is encoded once and the continuation is what follows the context's tokens.
        """
        results = []
        for req in tqdm(requests, disable=self.rank != 0, desc="mm1 loglikelihood"):
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            if not isinstance(continuation, str):
                continuation = continuation(doc)
            visuals = doc_to_visual(doc) if doc_to_visual is not None else None
            logprob, n, greedy = self.score_continuation(context, continuation, visuals)
            results.append(LoglikelihoodResult(-logprob / max(n, 1), greedy))
            self.cache_hook.add_partial(
                "loglikelihood", (context, continuation), tuple(results[-1])
            )
        return results

    @torch.no_grad()
    def score_continuation(
        self, context: str, continuation: str, visuals: Any = None
    ) -> tuple[float, int, bool]:
        """(summed log-probability of the continuation's tokens, their number, whether each is
        the argmax)."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if self.chat:  # the continuation is the assistant's answer, after the generation prompt
            ctx, pixels, sizes = self._request(context, visuals)
            ctx = ctx + self.tokenizer.encode(empty_block(self.reasoning))  # and no reasoning
            whole = ctx + self.tokenizer.encode(continuation)
        else:
            whole, pixels, sizes = self._request(context + continuation, visuals)
            ctx, _, _ = self._request(context, visuals)
        if whole[: len(ctx)] != ctx:  # the tokenizer merged across the boundary
            whole = ctx + self.tokenizer.encode(continuation)
        if not ctx:  # no BOS and an empty context: condition on EOS (a document boundary)
            ctx, whole = [self.tokenizer.eos_id], [self.tokenizer.eos_id, *whole]
        n_cont = len(whole) - len(ctx)
        if n_cont <= 0:
            return 0.0, 0, True
        ids = torch.tensor([whole], device=self.model.decoder.embed_tokens.weight.device)
        out = self.model(ids, pixel_values=pixels, image_sizes=sizes)
        logits = self.model.text_logits(out.logits[0, len(ctx) - 1 : -1]).float()
        target = ids[0, len(ctx) :]
        total = float(logits.log_softmax(-1).gather(-1, target[:, None]).sum())
        greedy = bool((logits.argmax(-1) == target).all())
        return total, n_cont, greedy
