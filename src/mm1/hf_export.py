"""`mm1 convert --to-hf`: a trained model as transformers directories.

A model with LLaVA's projector (`mlp` connector) becomes one directory that transformers loads
whole: `LlavaForConditionalGeneration` (layout `single`) or `LlavaNextForConditionalGeneration`
(`anyres`), with the processor `AutoProcessor.from_pretrained` builds (tokenizer, image
processor, chat template; `models/hf/llava.py` writes the weights). A `model.family: fuyu`
model becomes `FuyuForCausalLM` (`models/hf/fuyu.py`). Other connectors have no
transformers class: the whole model is written as transformers custom code
(`models/hf/custom.py`, loaded with `trust_remote_code=True`), and the decoder and the encoder
alone as `decoder/` and `vision/`, as before. So is a LLaVA-shaped model (layout `single`)
whose MoE decoder fits neither Mixtral nor Qwen3-MoE: LLaVA's text model must be a
transformers class, and that decoder is custom code too (`mm1_moe`); with layout `anyres`
(LLaVA-NeXT only) it is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from mm1.data.chat_template import with_parts_as_text
from mm1.data.images import PREPROCESSOR_CONFIG
from mm1.data.tokenizer import IMAGE_TOKEN
from mm1.pretrained import Pretrained, refuse_run_dir

PROCESSOR_CLASSES = {"llava": "LlavaProcessor", "llava_next": "LlavaNextProcessor"}
IMAGE_PROCESSOR_TYPES = {"llava": "CLIPImageProcessor", "llava_next": "LlavaNextImageProcessor"}


def save_hf(
    p: Pretrained, out_dir: str | Path, decoder_type: str | None = None
) -> tuple[Path, str]:
    """Write `p` for transformers; (the directory, a one-line account of what was written)."""
    from mm1.models.hf.custom_moe import CUSTOM_MOE_TYPE
    from mm1.models.hf.decoder import default_decoder_type
    from mm1.models.hf.llava import llava_model_type, save_llava_hf
    from mm1.models.hf.moe import moe_type_for

    out = Path(out_dir)
    refuse_run_dir(out, "out_dir")  # its model.safetensors would shadow the run's checkpoints
    if p.cfg.family == "fuyu":
        return _save_fuyu(p, out, decoder_type)
    try:
        model_type = llava_model_type(p.cfg)
    except ValueError as why:
        return _save_custom(p, out, decoder_type, str(why))
    text_cfg = p.model.decoder.cfg
    if (decoder_type or default_decoder_type(text_cfg)) == CUSTOM_MOE_TYPE:
        try:
            moe_type_for(text_cfg)
            why = f"--hf-type {CUSTOM_MOE_TYPE} is custom code"
        except ValueError as err:
            why = str(err)
        if model_type == "llava_next":
            raise ValueError(
                "--to-hf: the anyres layout runs in transformers only as LLaVA-NeXT, whose text "
                f"model must be a transformers class, and {why} (model.decoder.ffn / qk_norm)"
            )
        return _save_custom(
            p, out, decoder_type, f"LLaVA's text model is a transformers class: {why}"
        )
    if p.prompt_format.image_boundaries:
        raise ValueError(
            "--to-hf: the model was trained with <img> </img> around its image slots, which "
            "transformers' LLaVA processors do not write"
        )
    save_llava_hf(p.model, out, decoder_type)
    p.tokenizer.save(out)
    _add_bos_on_encode(p, out)
    _save_processor(p, out, model_type)
    return out, f"wrote {out} ({model_type}: {PROCESSOR_CLASSES[model_type]} + model)"


def _save_custom(p: Pretrained, out: Path, decoder_type: str | None, why: str) -> tuple[Path, str]:
    from mm1.models.hf import save_decoder_hf, save_vision_hf
    from mm1.models.hf.custom import save_custom_hf

    save_custom_hf(p.model, out, decoder_type)
    p.tokenizer.save(out)
    _add_bos_on_encode(p, out)
    p.processor.save_pretrained(out)
    save_decoder_hf(p.model.decoder, out / "decoder", model_type=decoder_type)
    p.tokenizer.save(out / "decoder")
    save_vision_hf(p.model.vision, out / "vision")
    p.processor.save_pretrained(out / "vision")
    return out, (
        f"wrote {out} as transformers custom code (not LLaVA: {why}; load it with "
        "AutoModel.from_pretrained(..., trust_remote_code=True)), and the decoder and the "
        f"encoder alone as {out}/decoder and {out}/vision"
    )


def _save_fuyu(p: Pretrained, out: Path, decoder_type: str | None) -> tuple[Path, str]:
    from mm1.models.hf import save_decoder_hf
    from mm1.models.hf.checkpoint import write_checkpoint
    from mm1.models.hf.fuyu import (
        IMAGE_NEWLINE_TOKEN,
        NEWLINE_TOKEN,
        fuyu_processor_config,
        fuyu_to_hf,
        image_newline_id,
    )

    hf, tensors = fuyu_to_hf(p.model, decoder_type)
    hf["dtype"] = str(p.model.decoder.embed_tokens.weight.dtype).removeprefix("torch.")
    write_checkpoint(out, hf, tensors)
    newline = image_newline_id(p.model)
    tok = p.tokenizer
    generation = {"suppress_tokens": [newline]}  # an image-row marker, never generated text
    generation.update(
        {
            k: v
            for k, v in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id))
            if v is not None
        }
    )
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tok.save(out)
    _add_bos_on_encode(p, out)
    # A model read from Fuyu-8B's directory has |NEWLINE| in its vocabulary already (a text
    # token by now, its row trained apart from the newline vector): the new row gets its own name.
    name = NEWLINE_TOKEN if tok.token_to_id(NEWLINE_TOKEN) is None else IMAGE_NEWLINE_TOKEN
    _add_token(out, name, newline)
    if p.cfg.image_layout.type == "fuyu":  # Fuyu's processor places images as the layout does
        processor = fuyu_processor_config(p.model, p.processor)
        (out / PREPROCESSOR_CONFIG).write_text(json.dumps(processor, indent=2) + "\n")
    else:  # `single`: every image resized to the square, as mm1's processor does
        p.processor.save_pretrained(out)
    save_decoder_hf(p.model.decoder, out / "decoder", model_type=decoder_type)
    tok.save(out / "decoder")
    return out, (
        f"wrote {out} (FuyuForCausalLM, the text model {hf['text_config']['model_type']}; "
        f"{name} is token {newline}; its image processor gives mm1's pixels. "
        "transformers' FuyuProcessor is not written: it reads Fuyu-8B's vocabulary; build "
        "inputs as mm1.models.hf.fuyu.hf_input_ids and hf_pixel_values do), and the decoder "
        "alone as "
        f"{out}/decoder"
    )


def _add_token(out: Path, token: str, token_id: int) -> None:
    """Add `token` as a special token to the exported tokenizer.json, where it gets `token_id`
    (the next id: the model's vocabulary is the tokenizer's, plus this row)."""
    import tokenizers

    path = out / "tokenizer.json"
    tok = tokenizers.Tokenizer.from_file(str(path))
    if tok.get_vocab_size(with_added_tokens=True) != token_id:
        raise ValueError(
            f"the tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, the "
            f"model {token_id}: {token} would not get id {token_id}"
        )
    tok.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)])
    tok.save(str(path))


def _add_bos_on_encode(p: Pretrained, out: Path) -> None:
    """mm1 writes BOS itself (it encodes without special tokens); transformers' processor
    encodes with them, so the exported tokenizer.json adds BOS the way Llama's does."""
    bos, bos_id = p.tokenizer.bos_token, p.tokenizer.bos_id
    if bos is None or bos_id is None:
        return
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    tok.save(str(out / "tokenizer.json"))


def _save_processor(p: Pretrained, out: Path, model_type: str) -> None:
    cfg = p.cfg
    p.processor.save_pretrained(out)
    path = out / PREPROCESSOR_CONFIG
    pre = json.loads(path.read_text())
    pre.pop("pad_to_square", None)
    pre["image_processor_type"] = IMAGE_PROCESSOR_TYPES[model_type]
    pre["processor_class"] = PROCESSOR_CLASSES[model_type]
    if model_type == "llava" and p.processor.pad_to_square:
        # LLaVA-1.5's expand-to-square is LlavaImageProcessor's do_pad (pixel-equal, tested).
        pre["image_processor_type"], pre["do_pad"] = "LlavaImageProcessor", True
    if model_type == "llava_next":
        from mm1.models.hf.llava import llava_config_to_hf

        pre["image_grid_pinpoints"] = llava_config_to_hf(cfg)["image_grid_pinpoints"]
        pre["do_pad"] = True
    path.write_text(json.dumps(pre, indent=2) + "\n")
    processor = {
        "processor_class": PROCESSOR_CLASSES[model_type],
        "image_token": IMAGE_TOKEN,
        "patch_size": cfg.vision.patch_size,
        "vision_feature_select_strategy": "default" if cfg.vision.cls_token else "full",
        "num_additional_image_tokens": int(cfg.vision.cls_token),
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    template = p.tokenizer.chat_template
    if isinstance(template, str):  # AutoProcessor's, prompted with lists of content parts
        (out / "chat_template.jinja").write_text(with_parts_as_text(template))
