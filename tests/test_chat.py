"""`mm1 chat` on a tiny trained run: the one-message form against `generate`, and the interactive
form driven through a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from mm1 import cli
from mm1.chat import (
    PROMPT,
    ChatSession,
    ChatSettings,
    TextStream,
    resolve_chat_template,
    run_interactive,
    stream_tokens,
)
from mm1.data.chat_template import BUILTIN_TEMPLATES
from mm1.data.sources import decode_image
from mm1.data.tokenizer import tokenize_prompt
from mm1.models import generation
from mm1.pretrained import Pretrained
from tests.cli_helpers import one_line

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 12


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_train_args) -> Path:
    from mm1 import cli

    tmp = tmp_path_factory.mktemp("chat")
    assert cli.main(["data", "synth", "--out", str(tmp / "world"), "--size", "tiny"]) == 0
    assert cli.main(tiny_train_args(tmp / "run")) == 0
    return tmp / "run"


@pytest.fixture
def images(run) -> list[Path]:
    return sorted((run.parent / "world" / "eval" / "val" / "images").iterdir())[:2]


@pytest.fixture
def pretrained(run, monkeypatch) -> Pretrained:
    """The run loaded once; `mm1 chat` in this process gets this very object."""
    from mm1 import pretrained as pretrained_module

    p = pretrained_module.load_pretrained(run)
    monkeypatch.setattr(pretrained_module, "load_pretrained", lambda *a, **k: p)
    return p


@pytest.fixture
def prompts(monkeypatch) -> list[list[int]]:
    """Every prompt the decoder is given, in order."""
    seen: list[list[int]] = []
    real = generation.DecodeBatch.prefill

    def spy(self, batch, *images):
        seen.extend(list(p) for p in batch)
        return real(self, batch, *images)

    monkeypatch.setattr(generation.DecodeBatch, "prefill", spy)
    return seen


@pytest.fixture
def reference_answer(pretrained, greedy_chat_answer):
    """`reference_answer(content, image_paths, template)`: the greedy answer by another road
    (conftest's `greedy_chat_answer`), never empty."""

    def answer(content: str, image_paths: list[Path], template: str) -> str:
        text = greedy_chat_answer(pretrained, content, image_paths, template, MAX_NEW)[0]
        assert text, "the model stopped at once: nothing to compare"
        return text

    return answer


def chat(*args: str) -> list[str]:
    return ["chat", *args, "--max-new-tokens", str(MAX_NEW)]


@pytest.mark.parametrize(
    ("message", "n_images", "content"),
    [
        ("Describe it.", 1, "<image>\nDescribe it."),  # images go first
        ("Is <image> like <image>?", 2, "Is <image> like <image>?"),  # or at the tags
        ("Hello.", 0, "Hello."),
    ],
)
def test_message_prints_what_generate_gives(
    reference_answer, run, pretrained, images, capsys, message, n_images, content
) -> None:
    paths = images[:n_images]
    args = [str(run), "--message", message, *(a for p in paths for a in ("--image", str(p)))]
    assert cli.main(chat(*args)) == 0
    captured = capsys.readouterr()
    assert captured.out == reference_answer(content, paths, "plain") + "\n"
    # the run was trained with the plain fallback, so it saved no template: said once, on stderr
    assert captured.err.count("no chat template") == 1 and "'plain'" in captured.err


def test_compiled_chat_prints_what_generate_gives(
    reference_answer, run, pretrained, images, capsys, monkeypatch
) -> None:
    """`mm1 chat --compile`: every decode step runs compiled, and the answer is the same."""
    from mm1.models.compiled_decode import CompiledDecode

    steps = []
    step = CompiledDecode.__call__
    monkeypatch.setattr(CompiledDecode, "__call__", lambda *a: steps.append(1) or step(*a))
    args = [str(run), "--message", "Describe it.", "--image", str(images[0]), "--compile"]
    assert cli.main(chat(*args)) == 0
    want = reference_answer("<image>\nDescribe it.", images[:1], "plain")
    assert want and capsys.readouterr().out == want + "\n"
    assert len(steps) >= len(pretrained.tokenizer.encode(want)) - 1


def test_templates_the_model_or_the_option_names(
    run, pretrained, tmp_path, capsys, prompts
) -> None:
    tok = pretrained.tokenizer
    hello = [{"role": "user", "content": "Hello."}]

    def rendered(template: str) -> list[int]:
        bos = [tok.bos_id]  # none of these templates writes BOS: it is added as in training
        return bos + tok.apply_chat_template(hello, True, chat_template=template)

    # --chat-template: a built-in name, or a file
    assert cli.main(chat(str(run), "--message", "Hello.", "--chat-template", "vicuna_v1")) == 0
    custom = tmp_path / "mine.jinja"
    custom.write_text(
        "{% for m in messages %}<< {{ m['content'] }} >>{% endfor %}"
        "{% if add_generation_prompt %} reply:{% endif %}"
    )
    assert cli.main(chat(str(run), "--message", "Hello.", "--chat-template", str(custom))) == 0
    # the tokenizer's own template, used without a notice
    tok.chat_template = BUILTIN_TEMPLATES["vicuna_v1"]
    try:
        assert cli.main(chat(str(run), "--message", "Hello.")) == 0
    finally:
        tok.chat_template = None
    assert "no chat template" not in capsys.readouterr().err
    assert prompts == [
        rendered("vicuna_v1"),
        rendered(custom.read_text()),
        rendered("vicuna_v1"),
    ]


def test_bad_input_is_one_line_and_exit_2(run, pretrained, images, tmp_path, capsys) -> None:
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    cases = [
        (["--image", str(tmp_path / "gone.png")], str(tmp_path / "gone.png")),
        (["--image", str(not_image)], str(not_image)),
        (["--image", str(images[0]), "--image", str(images[1])], "2 image(s)"),
        (["--chat-template", "nope"], "unknown chat template 'nope'"),
        (["--chat-template", "chatml"], "lacks its special tokens"),
    ]
    for extra, named in cases:
        message = "Is <image> it?" if len(extra) == 4 else "Describe it."
        assert cli.main(chat(str(run), "--message", message, *extra)) == 2
        out = capsys.readouterr().out
        lines = [line for line in out.splitlines() if line.strip()]
        assert len(lines) == 1 and named in out and "Traceback" not in out, out


def test_ctrl_c_stops_an_answer_not_the_chat(pretrained) -> None:
    """KeyboardInterrupt (Ctrl-C) during the third forward ends the first answer after two
    tokens; the answer stays in the conversation and the next message is answered in full."""
    calls: list[int] = []

    def interrupt(module, inputs, output):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    template = resolve_chat_template(pretrained.tokenizer, None)
    session = ChatSession(pretrained, template, ChatSettings(max_new_tokens=MAX_NEW))
    handle = pretrained.model.decoder.lm_head.register_forward_hook(interrupt)
    out = io.StringIO()
    try:
        run_interactive(session, io.StringIO("Hello.\nAgain?\n"), out)  # then end of input
    finally:
        handle.remove()
    text = out.getvalue()
    assert text.count(" [stopped]") == 1 and text.endswith(PROMPT + "\n")
    first = session.messages[1]["content"]
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert f"{PROMPT}{first} [stopped]\n" in text
    prompt = session.prompt_ids([{"role": "user", "content": "Hello."}], [])
    tokens = stream_tokens(pretrained.model, prompt, None, max_new_tokens=2, stop_ids=set())
    assert first == pretrained.tokenizer.decode(list(tokens))  # the two tokens before Ctrl-C


class Terminal:
    """A child process on a pseudo-terminal (its stdin and stdout are a tty, as for a user)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.chdir(ROOT)
            os.execve(argv[0], argv, env)
        self.buffer = b""
        self.exited = False

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def expect(self, marker: str, timeout: float = 60) -> str:
        """The output up to `marker` (line ends as \\n), consumed through it."""
        end = time.monotonic() + timeout
        want = marker.encode()
        while want not in self.buffer.replace(b"\r\n", b"\n"):
            left = end - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"no {marker!r} within {timeout}s; got {self.buffer!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the chat ended before {marker!r}; got {self.buffer!r}")
            self.buffer += chunk
        text = self.buffer.replace(b"\r\n", b"\n")
        before, _, self.buffer = text.partition(want)
        return before.decode("utf-8", errors="replace")

    def answer(self, line: str) -> str:
        self.send(line)
        out = self.expect("\n" + PROMPT)
        assert out.startswith(line + "\n"), out  # the terminal's echo of the typed line
        return out[len(line) + 1 :]

    def exit_code(self, timeout: float = 30) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exited = True
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:  # keep the terminal drained
                if select.select([self.fd], [], [], 0.1)[0]:
                    os.read(self.fd, 4096)
            except OSError:
                pass
        raise AssertionError("the chat did not exit")


# Run in the child: `mm1 chat` with every prompt the decoder gets written to a file.
_CHILD = """
import json, sys
from mm1 import cli
from mm1.models import generation
real = generation.DecodeBatch.prefill
def spy(self, prompts, *images):
    with open(sys.argv[1], "a") as f:
        f.write(json.dumps([list(p) for p in prompts]) + "\\n")
    return real(self, prompts, *images)
generation.DecodeBatch.prefill = spy
sys.exit(cli.main(sys.argv[2:]))
"""


def test_interactive_chat_through_a_terminal(
    reference_answer, run, pretrained, images, tmp_path, capsys
) -> None:
    log = tmp_path / "prompts.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONIOENCODING": "utf-8"}
    argv = [sys.executable, "-c", _CHILD, str(log), *chat(str(run))]
    term = Terminal(argv, env)
    try:
        banner = term.expect(PROMPT)
        assert "chat template: plain" in banner and "no chat template" in banner
        term.send("/image " + str(tmp_path / "gone.png"))
        error = term.expect("\n" + PROMPT).splitlines()[1:]
        assert len(error) == 1 and "gone.png" in error[0]  # one line, and the chat goes on
        term.send("/image " + str(images[0]))
        assert "image 1 attached" in term.expect("\n" + PROMPT)
        first = term.answer("Describe it.")
        second = term.answer("What colour is it?")
        term.send("/reset")
        assert "cleared" in term.expect("\n" + PROMPT)
        third = term.answer("Describe it.")
        term.send("/help")
        assert "/image PATH" in term.expect("\n" + PROMPT)
        term.send("/quit")
        assert term.exit_code() == 0
    finally:
        if not term.exited:
            os.kill(term.pid, signal.SIGKILL)
            os.waitpid(term.pid, 0)

    # turn 1 streams what the one-message form prints
    args = ["--message", "Describe it.", "--image", str(images[0])]
    assert cli.main(chat(str(run), *args)) == 0
    assert first + "\n" == capsys.readouterr().out
    assert first == reference_answer("<image>\nDescribe it.", images[:1], "plain")
    assert third == reference_answer("Describe it.", [], "plain")  # after /reset

    # turn 2's prompt is the whole conversation (turn 1, its answer and its image) ...
    prompts = [json.loads(line)[0] for line in log.read_text().splitlines()]
    assert len(prompts) == 3
    session = ChatSession(pretrained, resolve_chat_template(pretrained.tokenizer, None))
    history = [
        {"role": "user", "content": "<image>\nDescribe it."},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "What colour is it?"},
    ]
    pic = decode_image(images[0].read_bytes())
    assert prompts[1] == session.prompt_ids(history, [pic])
    assert prompts[2] == session.prompt_ids([{"role": "user", "content": "Describe it."}], [])
    # ... and its streamed answer is `generate`'s for that prompt
    tok = pretrained.tokenizer
    out = generation.generate(
        pretrained.model,
        [prompts[1]],
        pretrained.processor([pic]),
        max_new_tokens=MAX_NEW,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )[0]
    assert second == tok.decode([t for t in out if t != tok.eos_id])
    assert second != first  # the turns are told apart


def test_stop_tokens_end_the_answer_unprinted(run, pretrained, capsys) -> None:
    tok = pretrained.tokenizer
    said = tok.encode(" red")
    script = [*said, tok.eos_id, *tok.encode(" blue") * 10]
    steps: list[int] = []

    def force(module, inputs, logits: torch.Tensor) -> torch.Tensor:
        token = script[min(len(steps), len(script) - 1)]
        steps.append(token)
        logits = logits.clone()
        logits[:, -1] = -1e4
        logits[:, -1, token] = 1e4
        return logits

    handle = pretrained.model.decoder.lm_head.register_forward_hook(force)
    try:
        assert cli.main(chat(str(run), "--message", "Hello.")) == 0
    finally:
        handle.remove()
    assert capsys.readouterr().out == tok.decode(said) + "\n"
    assert steps[-1] == tok.eos_id  # nothing generated after it


def test_streamed_text_holds_back_split_characters(pretrained) -> None:
    # The world's tokenizer is byte-level: "é" and "猫" span tokens, whose lone decodings are
    # U+FFFD; the stream prints each character once it is whole.
    tok = pretrained.tokenizer
    text = "héllo 猫 wörld"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(len(ids)))  # split somewhere
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_a_long_conversation_is_told_to_reset(pretrained) -> None:
    limit = pretrained.model.cfg.decoder.max_seq_len
    template = resolve_chat_template(pretrained.tokenizer, None)
    session = ChatSession(pretrained, template, ChatSettings(max_new_tokens=MAX_NEW))
    answer = session.reply("Hello.", [], lambda piece: None)
    prompt = session.prompt_ids(session.messages[:1], [])
    assert session.length == len(prompt) + len(answer.tokens)
    assert session.context_notice() is None
    session.length = limit - 10  # as if the conversation had grown that long
    assert f"{limit} tokens: /reset" in session.context_notice()
    session.reset()
    assert session.context_notice() is None and not session.messages
    # a large --max-new-tokens alone says nothing
    large = ChatSession(pretrained, template, ChatSettings(max_new_tokens=10 * limit))
    large.length = len(prompt)
    assert large.context_notice() is None


def test_typed_part_templates_get_image_parts(pretrained, images, tmp_path, prompts) -> None:
    # llava-hf's template (a processor's, verbatim) reads content as typed parts: the chat's
    # `<image>` tags become {"type": "image"} parts, as in training.
    saved = (
        ROOT / "tests" / "data" / "chat_templates" / "llava-hf--llava-1.5-7b-hf.chat_template.json"
    )
    source = json.loads(saved.read_text())["chat_template"]
    (tmp_path / "llava.jinja").write_text(source)
    tok = pretrained.tokenizer
    template = resolve_chat_template(tok, str(tmp_path / "llava.jinja"))
    session = ChatSession(pretrained, template, ChatSettings(max_new_tokens=2))
    pic = decode_image(images[0].read_bytes())
    session.reply("What is it?", [pic], lambda piece: None)
    parts = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    text = tok.apply_chat_template(
        [{"role": "user", "content": parts}], True, tokenize=False, chat_template=source
    )
    assert text.count("<image>") == 1
    assert prompts == [tokenize_prompt(text, [pic], tok, pretrained.prompt_format)]


@pytest.mark.parametrize(
    "extra, named",
    [
        (
            ["--temperature", "nan"],
            "--temperature must be a finite number >= 0 (0: greedy), got nan",
        ),
        (
            ["--temperature", "inf"],
            "--temperature must be a finite number >= 0 (0: greedy), got inf",
        ),
        (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
    ],
)
def test_non_finite_sampling_flags_are_refused(run, capsys, extra, named) -> None:
    # NaN passes `< 0` and would sample from NaN logits; refused before the model loads
    assert cli.main(chat(str(run), "--message", "Hi.", *extra)) == 2
    assert " ".join(capsys.readouterr().out.split()) == f"config error: {named}"


def test_a_message_longer_than_the_context_is_refused(run, pretrained, capsys) -> None:
    limit = pretrained.model.cfg.decoder.max_seq_len
    assert cli.main(chat(str(run), "--message", "red " * limit)) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("config error: the prompt takes ") and out.endswith(
        f"tokens, more than the model's context of {limit} leaves room for an answer"
    )


def test_an_answer_stops_at_the_context(run, pretrained, monkeypatch, capsys) -> None:
    """A prompt that fits leaves `context - prompt` tokens for the answer, whatever
    --max-new-tokens asks: `mm1 chat` and `mm1 generate` decoded on past the positions the
    model was made for (`mm1 serve` stopped there, finish_reason "length")."""
    limit = pretrained.model.cfg.decoder.max_seq_len
    template = resolve_chat_template(pretrained.tokenizer, None)
    session = ChatSession(pretrained, template, ChatSettings(max_new_tokens=10 * limit))
    session.stop_ids = set()  # no stop token: the answer runs to its limit
    text = "red " * (limit - 30)
    room = limit - len(session.prompt_ids([{"role": "user", "content": text}], []))
    assert 0 < room < 40
    answer = session.reply(text, [], lambda piece: None)
    assert len(answer.tokens) == room and session.length == limit

    asked = []

    def recording(*args, **kw):
        asked.append(kw["max_new_tokens"])
        return [[]]

    monkeypatch.setattr(generation, "generate", recording)
    prompt = "red " * (limit - 8)
    assert cli.main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "100"]) == 0
    capsys.readouterr()
    ids = tokenize_prompt(prompt, [], pretrained.tokenizer, pretrained.prompt_format)
    assert asked == [limit - len(ids)] and 0 < asked[0] < 100


def test_an_unusable_device_is_one_line(run, capsys) -> None:
    cases = [("banana", "--device banana: not a device; give cpu, cuda or cuda:N")]
    if not torch.cuda.is_available():  # CPU-only torch: "Torch not compiled with CUDA enabled"
        cases.append(("cuda", "--device cuda: not usable here ("))
    for device, named in cases:
        assert cli.main(chat(str(run), "--message", "Hi.", "--device", device)) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert out.startswith(f"config error: {named}") and "Traceback" not in out, out


def test_template_kwargs_reach_the_template(run, pretrained, prompts, tmp_path, capsys) -> None:
    """`--chat-template-kwargs` are the template's variables (Qwen3's `enable_thinking`), as
    transformers' `apply_chat_template(**kwargs)` passes them."""
    source = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% if think %} Let me think.{% endif %}{% endif %}"
    )
    (tmp_path / "t.jinja").write_text(source)
    args = chat(str(run), "--message", "Hi.", "--chat-template", str(tmp_path / "t.jinja"))
    assert cli.main([*args, "--chat-template-kwargs", '{"think": true}']) == 0
    assert cli.main(args) == 0
    capsys.readouterr()
    tok = pretrained.tokenizer
    thinking, plain = (tok.decode(p, skip_special_tokens=False) for p in prompts)
    assert thinking.endswith("assistant: Let me think.") and plain.endswith("assistant:")
    for value, named in [("x", "not JSON"), ("[1]", "a JSON object of template variables")]:
        assert cli.main([*args, "--chat-template-kwargs", value]) == 2
        assert f"config error: --chat-template-kwargs: {named}" in capsys.readouterr().out
    # a template that refuses the variables: one line from `generate --chat` too
    refusing = "{% if not think %}{{ raise_exception('thinking is off') }}{% endif %}" + source
    tok.chat_template, own = refusing, tok.chat_template
    try:
        argv = ["generate", str(run), "--prompt", "Hi.", "--chat"]
        line = one_line(capsys, [*argv, "--chat-template-kwargs", '{"think": false}'], 2)
    finally:
        tok.chat_template = own
    assert line == "config error: --chat-template-kwargs: the chat template failed: thinking is off"


# A template that writes reasoning blocks as Qwen3's does: earlier answers lose theirs, and with
# `think` false the prompt holds an empty block, so the answer starts after it.
THINKING = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['role'] == 'assistant' %}{{ m['content'].split('</think>')[-1].lstrip() }}"
    "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:"
    "{% if think is defined and not think %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _forced(pretrained: Pretrained, text: str):
    """An lm_head hook making the model write `text`, then its end of sequence, each answer."""
    tok = pretrained.tokenizer
    script = [*tok.encode(text), tok.eos_id]
    assert tok.decode(script[:-1]) == text
    steps: list[int] = []

    def force(module, inputs, logits: torch.Tensor) -> torch.Tensor:
        token = script[len(steps) % len(script)]
        steps.append(token)
        logits = logits.clone()
        logits[:, -1] = -1e4
        logits[:, -1, token] = 1e4
        return logits

    return pretrained.model.decoder.lm_head.register_forward_hook(force)


def test_a_reasoning_block_is_shown_apart_from_the_answer_or_hidden(
    run, pretrained, prompts, tmp_path, capsys
) -> None:
    """`mm1 chat` prints an answer's `<think>` block between 'Thinking...' and '...done
    thinking.' (as `ollama run` does), or not with --hide-reasoning; the conversation keeps
    the whole answer, which the template reads (dropping the block, as Qwen3's does)."""
    (tmp_path / "think.jinja").write_text(THINKING)
    args = chat(str(run), "--message", "Hi.", "--chat-template", str(tmp_path / "think.jinja"))
    args += ["--max-new-tokens", "64"]  # room for the whole forced answer
    said = "<think>\nlook at it\n</think>\n\nA red cube."
    for extra, shown in [
        ([], "Thinking...\nlook at it\n...done thinking.\n\nA red cube.\n"),
        (["--hide-reasoning"], "A red cube.\n"),
    ]:
        handle = _forced(pretrained, said)
        try:
            assert cli.main([*args, *extra]) == 0
        finally:
            handle.remove()
        assert capsys.readouterr().out == shown
    # an empty block (the template's `think` off): nothing but the answer
    handle = _forced(pretrained, "A red cube.")
    try:
        assert cli.main([*args, "--chat-template-kwargs", '{"think": false}']) == 0
    finally:
        handle.remove()
    assert capsys.readouterr().out == "A red cube.\n"
    assert pretrained.tokenizer.decode(prompts[-1]).endswith("assistant:<think>\n\n</think>\n\n")

    # interactively: the same block per answer; the second prompt holds the first answer
    # without its block
    template = resolve_chat_template(pretrained.tokenizer, str(tmp_path / "think.jinja"))
    session = ChatSession(pretrained, template, ChatSettings(max_new_tokens=64))
    out = io.StringIO()
    handle = _forced(pretrained, said)
    try:
        run_interactive(session, io.StringIO("Hi.\nAgain?\n"), out)
    finally:
        handle.remove()
    assert out.getvalue().count("Thinking...\nlook at it\n...done thinking.\n\nA red cube.\n") == 2
    assert session.messages[1]["content"] == said
    second = pretrained.tokenizer.decode(prompts[-1])
    assert "A red cube." in second and "look at it" not in second


def test_reasoning_is_dimmed_on_a_terminal_and_closed_when_the_answer_ends_inside() -> None:
    from mm1.chat import ReasoningDisplay

    out: list[str] = []
    shown = ReasoningDisplay(out.append, hide=False, tty=True)
    shown.reasoning("hmm")
    shown.end()  # out of tokens inside the block
    dim, reset = ReasoningDisplay.DIM, ReasoningDisplay.RESET
    assert (
        "".join(out) == f"{dim}Thinking...\n{reset}{dim}hmm{reset}{dim}\n...done thinking.\n{reset}"
    )
    out.clear()
    hidden = ReasoningDisplay(out.append, hide=True, tty=True)
    hidden.reasoning("hmm")
    hidden.text("yes")
    hidden.end()
    assert out == ["yes"]
    out.clear()
    hidden.reasoning("hmm")  # and no answer after it
    hidden.end()
    assert out == [f"{dim}(the answer ended inside its reasoning block){reset}"]
