"""The options of the commands that run a trained model (`mm1 generate`, `chat`, `serve`,
`eval`, `recaption`, ...): where and in what precision it runs, and the chat template's extra
variables. Shared by the CLI and the server's own parser; no torch import (help stays fast)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mm1.config import ConfigError


def add_runtime_arguments(p: argparse.ArgumentParser, read_into: bool = True) -> None:
    """`--device` and `--dtype`: where, and in what precision, a command runs a loaded model
    (`read_into`: its weights are read straight into the dtype, not cast after loading)."""
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    how = "; read straight into it" if read_into else "; the scores are computed in fp32"
    p.add_argument(
        "--dtype",
        default="float32",
        help="the weights' and activations' precision: float32 (default), bfloat16 (bf16; half "
        f"the memory, the usual choice on a GPU) or float16 (fp16){how}",
    )


TEMPLATE_KWARGS_HELP = (
    "extra chat-template variables as a JSON object, as transformers' apply_chat_template takes "
    """them: '{"enable_thinking": false}' turns Qwen3's reasoning off"""
)


def template_kwargs(value: str | None, option: str = "--chat-template-kwargs") -> dict[str, Any]:
    """`--chat-template-kwargs`' JSON object (None: {}), or one line naming `option`."""
    if value is None:
        return {}
    try:
        kwargs = json.loads(value)
    except ValueError as err:
        raise ConfigError(
            f"{option}: not JSON ({err}); give an object, e.g. "
            """'{"enable_thinking": false}'"""
        ) from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{option}: a JSON object of template variables, not {value}")
    return kwargs
