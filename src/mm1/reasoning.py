"""The reasoning block of a chat model's answer. Chat templates that write `<think>…</think>`
(Qwen3's and others) teach a model to open its answer with that block, an empty one when the
training turn had no reasoning: the answer proper comes after it. As vLLM's reasoning parsers
do, the text is split into its reasoning (between the tags, newlines at both ends dropped, as
the templates' `strip('\\n')`) and its content (after `</think>`, leading newlines dropped, as
their `lstrip('\\n')`). An answer whose prompt already opened the block (a generation prompt
ending in `<think>`) starts inside it. Text with no block is all content."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from mm1.data.chat_template import render, select_template, uses_typed_parts

if TYPE_CHECKING:
    from mm1.data.prompt_format import PromptFormat
    from mm1.data.tokenizer import Tokenizer

OPEN, CLOSE = "<think>", "</think>"


def chat_reasoning(source: str, variables: Mapping[str, str]) -> bool | None:
    """None when the chat template `source` writes no reasoning block; else whether its
    generation prompt opens one (the answer then starts inside it). `variables`: the
    tokenizer's named special tokens (`Tokenizer.template_variables`)."""
    if CLOSE not in source:
        return None
    content = [{"type": "text", "text": "Hi"}] if uses_typed_parts(source) else "Hi"
    prompt, _ = render(source, [{"role": "user", "content": content}], True, dict(variables))
    return prompt.rstrip().endswith(OPEN)


def format_reasoning(tokenizer: Tokenizer, fmt: PromptFormat) -> bool | None:
    """`chat_reasoning` of the template a prompt format chats with."""
    own = tokenizer.chat_template
    _, source = select_template(own, fmt.template_choice(own))
    return chat_reasoning(source, tokenizer.template_variables)


def empty_block(opened: bool | None) -> str:
    """What such a template writes before the answer of a turn without reasoning: an empty
    block (its rest, after a prompt that opened it); nothing for a template without blocks.
    The context an answer is scored in, as the model was trained to write it."""
    if opened is None:
        return ""
    block = f"{OPEN}\n\n{CLOSE}\n\n"
    return block[len(OPEN) + 1 :] if opened else block


class ReasoningSplitter:
    """Splits a growing answer into reasoning and content pieces: `push` takes the whole text so
    far (each call's text extends the last one's) and returns the new (reasoning, content)
    pieces; text that may still turn out to be a tag, or newlines a tag would drop, is held
    back until `finish` is given the whole answer. The pieces of each kind join up to
    `split_reasoning`'s."""

    def __init__(self, opened: bool = False) -> None:
        self.state = "start"
        self._enter("reasoning" if opened else "start", 0, lead=opened)

    def push(self, text: str) -> tuple[str, str]:
        return self._advance(text, final=False)

    def finish(self, text: str) -> tuple[str, str]:
        return self._advance(text, final=True)

    def _advance(self, text: str, final: bool) -> tuple[str, str]:
        if self.state == "start":
            head = text.lstrip()
            if head.startswith(OPEN):
                self._enter("reasoning", len(text) - len(head) + len(OPEN))
            elif OPEN.startswith(head) and not final:  # nothing yet, or the tag may still come
                return "", ""
            else:  # no block: all of it is content, as it is
                self._enter("content", 0, lead=False)
        reasoning = ""
        if self.state == "reasoning":
            end = text.find(CLOSE, self.pos)
            if end < 0:
                held = 0 if final else _held_tag(text, CLOSE)
                return self._piece(text[: len(text) - held], strip_end=True), ""
            reasoning = self._piece(text[:end], strip_end=True)
            self._enter("content", end + len(CLOSE))
        return reasoning, self._piece(text, strip_end=not final)

    def _enter(self, state: str, pos: int, lead: bool = True) -> None:
        """Start a part of the text at `pos`; `lead`: drop its leading newlines (after a tag)."""
        self.state, self.pos, self.sent, self.lead = state, pos, pos, lead

    def _piece(self, body: str, strip_end: bool) -> str:
        """The current part's text in `body` not handed out yet; with `strip_end` its trailing
        newlines are held back (a closing tag would drop them)."""
        if self.lead:
            rest = body[self.pos :].lstrip("\n")
            if not rest:
                return ""
            self.pos = self.sent = len(body) - len(rest)
            self.lead = False
        if strip_end:
            body = body.rstrip("\n")
        piece = body[self.sent :]
        self.sent += len(piece)
        return piece


def _held_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that starts `tag` (it may yet become the tag)."""
    return next(
        (n for n in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:n])), 0
    )


def split_reasoning(text: str, opened: bool = False) -> tuple[str, str]:
    """(reasoning, content) of a whole answer; `opened`: its prompt opened the block."""
    splitter = ReasoningSplitter(opened)
    r1, c1 = splitter.push(text)
    r2, c2 = splitter.finish(text)
    return r1 + r2, c1 + c2
