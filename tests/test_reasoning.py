"""Reasoning blocks (`<think>…</think>`) split from answers: the split of a whole answer as the
templates write the block, the same split when the answer arrives in pieces, and the server's
events for an answer decoded token by token (with a stop string). The templates' side (which
write a block, and the SFT suite's reading) is in tests/data/test_chat_template.py."""

from __future__ import annotations

import random

import pytest

from mm1.reasoning import ReasoningSplitter, split_reasoning
from mm1.serve.engine import Event, Handle, Request, _Answer

WHOLE = [
    # Qwen3's empty block, as its template writes a turn without reasoning
    ("<think>\n\n</think>\n\nA cube.", False, ("", "A cube.")),
    ("<think>\nstep one\n\nstep two\n</think>\n\nyes", False, ("step one\n\nstep two", "yes")),
    ("  <think>x</think>y\n", False, ("x", "y\n")),
    ("\nno block\n", False, ("", "\nno block\n")),  # read as it is
    ("a </think> b", False, ("", "a </think> b")),  # a tag midway opens nothing
    ("<thin", False, ("", "<thin")),
    ("", False, ("", "")),
    ("<think>\nran out of tokens\n", False, ("ran out of tokens", "")),
    # the prompt opened the block (a generation prompt ending in <think>)
    ("\nreason\n</think>\n\nanswer", True, ("reason", "answer")),
    ("still reasoning", True, ("still reasoning", "")),
    ("<think>\nab</thin k</think>\n\n\ncd\n\nef\n", False, ("ab</thin k", "cd\n\nef\n")),
]


@pytest.mark.parametrize(("text", "opened", "want"), WHOLE)
def test_a_whole_answer_splits_as_the_templates_write_the_block(text, opened, want) -> None:
    assert split_reasoning(text, opened) == want


@pytest.mark.parametrize(("text", "opened", "want"), WHOLE)
def test_pieces_join_up_to_the_whole_answers_split(text, opened, want) -> None:
    """Whatever the points the text grows by, each kind's pieces join up to the whole split
    (a tag cut in two, newlines a tag drops: held back, never sent and taken back)."""
    rng = random.Random(text)
    for _ in range(100):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        splitter, reasoning, content = ReasoningSplitter(opened), "", ""
        for k in cuts:
            r, c = splitter.push(text[:k])
            reasoning, content = reasoning + r, content + c
        r, c = splitter.finish(text)
        assert (reasoning + r, content + c) == want, cuts


class _Chars:
    """A tokenizer whose token ids are characters' code points."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


@pytest.mark.parametrize("reasoning", [None, False])
def test_the_server_sends_reasoning_and_content_as_they_are_decoded(reasoning) -> None:
    """Token by token through the engine's answer: with a reasoning template the block comes
    as `reasoning` events and the rest as `text`, up to the stop string; without one, all of it
    is text, as before."""
    events: list[Event] = []
    request = Request(prompt=[65], pixel_values=None, max_new_tokens=100, stop=("STOP",))
    answer = _Answer(Handle(request, events.append), _Chars(), {0}, reasoning)
    said = "<think>\nlook at it\n</think>\n\nA red cube.\nSTOP and more"
    finish = None
    for ch in said:
        finish = answer.take(ord(ch))
        if finish:
            break
    assert finish == "stop"
    got = {k: "".join(e.text for e in events if e.kind == k) for k in ("reasoning", "text")}
    if reasoning is None:
        assert got == {"reasoning": "", "text": said[: said.find("STOP")]}
    else:
        assert got == {"reasoning": "look at it", "text": "A red cube.\n"}
        # streamed as it came: the reasoning before the answer, in several pieces
        kinds = [e.kind for e in events]
        assert kinds.index("text") > max(i for i, k in enumerate(kinds) if k == "reasoning")
        assert kinds.count("reasoning") > 1 and kinds.count("text") > 1
