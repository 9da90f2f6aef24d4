"""Chat templates rendered as transformers renders them, on real templates, and the loss masks
they give (tests/data/chat_templates/README.md says where each template comes from)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from PIL import Image
from tokenizers import decoders, models, pre_tokenizers, trainers

from mm1.data.chat_template import (
    BUILTIN_TEMPLATES,
    BUILTIN_TOKENS,
    check_template,
    load_chat_template,
)
from mm1.data.document import Conversation
from mm1.data.prompt_format import PromptFormat
from mm1.data.tokenizer import (
    IMAGE_TOKEN,
    Tokenizer,
    tokenize_chat_prompt,
    tokenize_conversation,
)
from mm1.eval.suite import SuitePrompter
from mm1.reasoning import chat_reasoning, format_reasoning

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent / "chat_templates"
CORPUS = [
    "You are a helpful assistant. Be brief.",
    "What is in the picture? A small blue cube on a red mat.",
    "What colour is the ball? green. How many dogs? two dogs play in the snow.",
    "USER: ASSISTANT: system user assistant",
] * 4

# name -> (file, config file name in the tokenizer dir, special tokens, bos, eos, typed parts)
CASES = {
    "llama3": (
        "meta-llama--Meta-Llama-3-8B-Instruct.tokenizer_config.json",
        "tokenizer_config.json",
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "<|begin_of_text|>",
        "<|eot_id|>",
        False,
    ),
    "qwen2": (
        "Qwen--Qwen2-7B-Instruct.tokenizer_config.json",
        "tokenizer_config.json",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|im_end|>",
        False,
    ),
    "qwen3": (
        "Qwen--Qwen3-0.6B.chat_template.jinja",
        "chat_template.jinja",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|im_end|>",
        False,
    ),
    "llava": (
        "llava-hf--llava-1.5-7b-hf.chat_template.json",
        "chat_template.json",
        ["<unk>", "<s>", "</s>"],
        "<s>",
        "</s>",
        True,
    ),
}


def _template(name: str) -> str:
    file = TEMPLATES / CASES[name][0]
    return (
        file.read_text()
        if file.suffix == ".jinja"
        else json.loads(file.read_text())["chat_template"]
    )


def _tokenizer_dir(d: Path, name: str) -> Path:
    """A small byte-level BPE with the template's special tokens, its config naming BOS / EOS,
    and the template stored where the model repository stores it."""
    file, config_name, specials, bos, eos, _ = CASES[name]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if name == "qwen3":  # added tokens, not special ones, in Qwen3's tokenizer.json
        tok.add_tokens(["<think>", "</think>"])
    d.mkdir(parents=True)
    tok.save(str(d / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": eos}
    if config_name == "tokenizer_config.json":
        config |= json.loads((TEMPLATES / file).read_text())
    else:
        (d / config_name).write_text((TEMPLATES / file).read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> tuple[str, Tokenizer, object]:
    """(name, our tokenizer, transformers' tokenizer over the same vocabulary and template)."""
    name = request.param
    ours = Tokenizer.from_file(_tokenizer_dir(tmp_path_factory.mktemp(name) / "tok", name))
    saved = tmp_path_factory.mktemp(name) / "saved"
    ours.save(saved)  # the vocabulary with mm1's added tokens, <image> among them
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(saved / "tokenizer.json"),
        bos_token=ours.bos_token,
        eos_token=ours.eos_token,
        pad_token=ours.pad_token,
        chat_template=_template(name),
    )
    return name, ours, hf


def _content(text: str, typed: bool, images: int = 0) -> str | list[dict[str, str]]:
    if not typed:
        return IMAGE_TOKEN * images + text
    return [{"type": "image"}] * images + [{"type": "text", "text": text}]


def _conversations(typed: bool) -> list[tuple[list[dict], bool]]:
    """(messages, add_generation_prompt): system or not, one or several turns, images."""
    c = lambda text, images=0: _content(text, typed, images)  # noqa: E731
    return [
        ([{"role": "user", "content": c("What is in the picture?", 1)}], True),
        (
            [
                {"role": "system", "content": c("Be brief.")},
                {"role": "user", "content": c("What is in the picture?", 1)},
                {"role": "assistant", "content": c("A small blue cube.")},
                {"role": "user", "content": c("  What colour is the ball?\n")},
                {"role": "assistant", "content": c("green")},
            ],
            False,
        ),
        (
            [
                {"role": "user", "content": c("How many dogs?", 2)},
                {"role": "assistant", "content": c("two dogs ✓")},
                {"role": "user", "content": c("And cats?")},
            ],
            True,
        ),
    ]


def test_text_and_ids_equal_transformers(case) -> None:
    name, ours, hf = case
    for messages, gen in _conversations(typed=CASES[name][5]):
        text = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        ids = hf.apply_chat_template(messages, add_generation_prompt=gen, return_dict=False)
        assert ours.apply_chat_template(messages, gen, tokenize=False) == text
        assert ours.apply_chat_template(messages, gen) == list(ids)
        assert len(ids) > 5 and ours.decode(list(ids), skip_special_tokens=False) == text
        # The template's special tokens are whole tokens, not spelled out.
        assert all(ours.token_to_id(t) in ids for t in CASES[name][2] if t in text)


def test_template_argument_and_generation_prompt(case) -> None:
    name, ours, hf = case
    messages = _conversations(typed=CASES[name][5])[0][0]
    prompt = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bare = ours.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert prompt.startswith(bare) and len(prompt) > len(bare)
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = ours.apply_chat_template(plain, tokenize=False, chat_template="plain")
    assert text == f"User: Hi\nAssistant: Hello{ours.eos_token}"
    assert text == hf.apply_chat_template(
        plain, tokenize=False, chat_template=BUILTIN_TEMPLATES["plain"]
    )


def test_builtin_llama3_renders_like_the_real_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_file(_tokenizer_dir(tmp_path / "tok", "llama3"))
    for messages, gen in _conversations(typed=False):
        real = tok.apply_chat_template(messages, gen, tokenize=False)
        assert tok.apply_chat_template(messages, gen, False, chat_template="llama3") == real


def _sft(typed_images: int = 1) -> Conversation:
    return Conversation(
        id="rec-7",
        images=[Image.new("RGB", (8, 8))] * typed_images,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>\nWhat is in the picture?"},
            {"role": "assistant", "content": "A small blue cube."},
            {"role": "user", "content": "What colour is the ball?"},
            {"role": "assistant", "content": "green"},
        ],
    )


def test_loss_mask_is_assistant_content_and_end_of_turn(case) -> None:
    name, ours, hf = case
    out = tokenize_conversation(_sft(), ours, PromptFormat(3))
    targets = [i for i, m in zip(out.input_ids, out.target_mask) if m]
    others = [i for i, m in zip(out.input_ids, out.target_mask) if not m]
    end = "</s>" if name == "llava" else ours.eos_token  # llava-hf's: EOS added by training
    learned = ours.decode(targets, skip_special_tokens=False)
    # Qwen3's template writes an empty reasoning block in the turns after the last question
    # only: the model learns to open its answer with it there (mm1.reasoning reads it back).
    think = "<think></think>" if name == "qwen3" else ""
    assert learned.replace(" ", "").replace("\n", "") == f"Asmallbluecube.{end}{think}green{end}"
    rest = ours.decode(others, skip_special_tokens=False)
    for scaffold in ("Be brief.", "What is in the picture?", "What colour is the ball?"):
        assert scaffold in rest
    assert "cube" not in rest and "green" not in rest
    assert out.input_ids.count(ours.image_id) == 3
    start, stop = out.image_spans[0]
    assert not any(out.target_mask[start:stop])
    # Apart from the training-time EOS, the sample is the template's rendering.
    typed = CASES[name][5]
    messages = [
        {"role": m["role"], "content": _content(m["content"].replace("<image>\n", ""), typed)}
        for m in _sft().messages
    ]
    messages[1]["content"] = _content("What is in the picture?", typed, images=1)
    if not typed:
        messages[1]["content"] = "<image>\nWhat is in the picture?"
    rendered = hf.apply_chat_template(messages, tokenize=False)
    one_slot = [*out.input_ids[:start], ours.image_id, *out.input_ids[stop:]]
    text = ours.decode(one_slot, skip_special_tokens=False)
    if name == "llava":
        text = text.replace("</s>", "")
    if ours.bos_token and not rendered.startswith(ours.bos_token):
        text = text.removeprefix(ours.bos_token)
    assert text == rendered


def test_template_saved_and_loaded(tmp_path: Path) -> None:
    tok = Tokenizer.from_file(_tokenizer_dir(tmp_path / "tok", "llava"))  # chat_template.json
    assert tok.chat_template == _template("llava")
    tok.save(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == _template("llava")
    assert Tokenizer.from_file(tmp_path / "saved").chat_template == _template("llava")
    # chat_template.jinja wins over the config; several named templates load as a dict.
    (tmp_path / "saved" / "chat_template.jinja").write_text("{{ 'x' }}")
    assert Tokenizer.from_file(tmp_path / "saved").chat_template == "{{ 'x' }}"
    config["chat_template"] = [
        {"name": "default", "template": "A"},
        {"name": "rag", "template": "B"},
    ]
    (tmp_path / "saved" / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "saved" / "chat_template.jinja").unlink()
    assert load_chat_template(tmp_path / "saved") == {"default": "A", "rag": "B"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop(2), "roles do not alternate"),
        (lambda m: m[1].update(role="gpt"), "starts with the assistant"),
        (lambda m: m[2].update(content="  "), "empty assistant turn"),
        (lambda m: m[3].update(content="<image> again"), "2 <image> tags in the messages but 1"),
    ],
)
def test_bad_conversations_name_the_record(case, edit, message: str) -> None:
    _, ours, _ = case
    conv = _sft()
    edit(conv.messages)
    with pytest.raises(ValueError, match=rf"conversation 'rec-7'.*{message}"):
        tokenize_conversation(conv, ours, PromptFormat(3))


def test_template_that_raises_is_a_value_error(tmp_path: Path) -> None:
    tok = Tokenizer.from_file(_tokenizer_dir(tmp_path / "tok", "qwen2"))
    tok.chat_template = "{{ raise_exception('only one turn') }}"
    with pytest.raises(ValueError, match="'rec-7': the chat template failed: only one turn"):
        tokenize_conversation(_sft(), tok, PromptFormat(3))


def test_loader_skips_and_counts_bad_conversations(tmp_path: Path, caplog) -> None:
    from mm1.config import SourceConfig
    from mm1.data.images import ImageProcessor
    from mm1.data.loader import LoaderSettings, PackedDataset

    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "green"}]}
    bad = {"conversations": [{"from": "gpt", "value": "green"}, {"from": "human", "value": "Hi"}]}
    records = [{"id": f"r{i}", **(bad if i == 3 else good)} for i in range(8)]
    (tmp_path / "sft.json").write_text(json.dumps(records))
    tok = Tokenizer.from_file(_tokenizer_dir(tmp_path / "tok", "qwen2"))
    source = SourceConfig(format="llava", path=str(tmp_path / "sft.json"))
    settings = LoaderSettings(
        [source], seq_len=64, micro_batch_size=1, prompt_format=PromptFormat(2)
    )
    settings.max_error_rate = 1.0
    ds = PackedDataset(settings, tok, ImageProcessor.clip(16))
    batch = next(iter(ds))
    stats = ds.read_stats()
    # Epochs repeat the 8 records: r3, and only r3, is skipped each time it comes.
    assert set(stats.skipped) == {"untokenizable"}
    k = stats.skipped["untokenizable"]  # passes that reached r3; records counts the 7 others
    assert 7 * (k - 1) + 3 <= stats.records <= 7 * k + 3
    assert "conversation 'r3': starts with the assistant" in caplog.text
    # The Qwen2 template (the tokenizer's own) wrote the sample: <|im_end|> is learned.
    assert tok.token_to_id("<|im_end|>") in batch.labels.tolist()[0]


def test_a_conversation_longer_than_a_sequence_keeps_its_head(tmp_path: Path) -> None:
    """Truncated, counted, never split: its tail would train answers without their question
    (and, with an image, without the image)."""
    from mm1.config import SourceConfig
    from mm1.data.images import ImageProcessor
    from mm1.data.loader import LoaderSettings, PackedDataset, loader_counts

    answer = " ".join(["green"] * 200)
    conv = [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": answer}]
    (tmp_path / "sft.json").write_text(json.dumps([{"id": "long", "conversations": conv}]))
    tok = Tokenizer.from_file(_tokenizer_dir(tmp_path / "tok", "qwen2"))
    source = SourceConfig(format="llava", path=str(tmp_path / "sft.json"))
    settings = LoaderSettings(
        [source], seq_len=64, micro_batch_size=1, prompt_format=PromptFormat(2)
    )
    ds = PackedDataset(settings, tok, ImageProcessor.clip(16))
    batch = next(iter(ds))
    first = tokenize_conversation(
        Conversation(
            "long",
            [],
            [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": answer}],
        ),
        tok,
        PromptFormat(2),
    )
    # every row is the conversation's first 64 tokens: its head, again and again
    assert batch.input_ids[0].tolist() == first.input_ids[:64]
    counts = loader_counts(ds.state_dict())
    assert counts["truncated_documents"] >= 1 and counts["skipped_records"] == 0


@pytest.mark.parametrize("max_error_rate", [0.01, 0.5, 1.0])
def test_a_source_of_unusable_conversations_stops(tmp_path: Path, max_error_rate: float) -> None:
    """Records the reader read but the tokenizer refused count once, as skipped (they were also
    counted as read: the rate of an all-bad source could not pass 50%, and at a higher
    `data.max_error_rate` the loader read it forever); a whole pass with no usable record
    stops whatever the rate allows: here at the first record of the third pass (a slot's share
    of a sharded source changes with each epoch's shuffle, so one pass is not enough to judge)."""
    from mm1.config import SourceConfig
    from mm1.data.images import ImageProcessor
    from mm1.data.loader import LoaderSettings, PackedDataset
    from mm1.data.sources import DataError

    bad = {"conversations": [{"from": "gpt", "value": "green"}, {"from": "human", "value": "Hi"}]}
    (tmp_path / "sft.json").write_text(json.dumps([{"id": f"r{i}", **bad} for i in range(3)]))
    tok = Tokenizer.from_file(_tokenizer_dir(tmp_path / "tok", "qwen2"))
    source = SourceConfig(format="llava", path=str(tmp_path / "sft.json"))
    settings = LoaderSettings(
        [source], seq_len=64, micro_batch_size=1, prompt_format=PromptFormat(2)
    )
    settings.max_error_rate = max_error_rate
    ds = PackedDataset(settings, tok, ImageProcessor.clip(16))
    expected = (  # judged as the third record is read: it was "2 of 5" (the two counted twice)
        r"2 of 3 records were skipped \(66\.7%; untokenizable=2\)"
        if max_error_rate == 0.01
        else r"a whole pass over its records gave no usable document \(7 skipped: untokenizable=7"
    )
    with pytest.raises(DataError, match=expected):
        next(iter(ds))


def test_data_chat_template_option(tmp_path: Path) -> None:
    from mm1.config import ConfigError, DataConfig, ModelConfig, SourceConfig
    from mm1.data.world import prepare_data

    (tmp_path / "sft.json").write_text("[]")
    (tmp_path / "mine.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    source = SourceConfig(format="llava", path=str(tmp_path / "sft.json"))
    tok_dir = str(_tokenizer_dir(tmp_path / "tok", "llava"))

    def prepared(value: str) -> Tokenizer:
        data = DataConfig(tokenizer=tok_dir, sources=[source], chat_template=value)
        return prepare_data(data, ModelConfig()).tokenizer

    assert prepared("").chat_template == _template("llava")  # the tokenizer's own
    assert prepared("vicuna_v1").chat_template == BUILTIN_TEMPLATES["vicuna_v1"]
    assert prepared(str(tmp_path / "mine.jinja")).chat_template.startswith("{% for m in")
    with pytest.raises(ConfigError, match="data.chat_template: 'zephyr' is neither a built-in"):
        prepared("zephyr")
    with pytest.raises(ConfigError, match=r"data.chat_template='chatml' needs .*<\|im_start\|>"):
        prepared("chatml")


BROKEN_TEMPLATES = {
    # name -> (jinja source, what the error says)
    "unbalanced_for": (
        "{% for m in messages %}{{ m['content'] }}",
        "syntax error at line 1: Unexpected end of template",
    ),
    "stray_braces": (
        "{% for m in messages %}\n{{ m['content'] } }}{% endfor %}",
        "syntax error at line 2: unexpected '}'",
    ),
    "raises": ("{{ raise_exception('no chats here') }}", "fails to render .*no chats here"),
    "undefined": (
        "{{ messages[0].content.nope.deeper }}",
        "fails to render .*has no attribute 'nope'",
    ),
    "no_answer": (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
        "{% endfor %}",
        "cannot be trained on: .*does not write the assistant's content",
    ),
    "empty_marks": (
        "{% for m in messages %}{{ m['content'] }}{% generation %}{% endgeneration %}{% endfor %}",
        "does not write the assistant's answer",
    ),
}


@pytest.mark.parametrize("broken", list(BROKEN_TEMPLATES))
def test_a_data_chat_template_that_cannot_render_is_a_config_error(
    tmp_path: Path, broken: str
) -> None:
    # Chosen, it is tried once: not every record skipped as untokenizable, blaming the data.
    from mm1.config import ConfigError, DataConfig, ModelConfig, SourceConfig
    from mm1.data.world import prepare_data

    source_text, message = BROKEN_TEMPLATES[broken]
    (tmp_path / "sft.json").write_text("[]")
    path = tmp_path / "broken.jinja"
    path.write_text(source_text)
    data = DataConfig(
        tokenizer=str(_tokenizer_dir(tmp_path / "tok", "qwen2")),
        sources=[SourceConfig(format="llava", path=str(tmp_path / "sft.json"))],
        chat_template=str(path),
    )
    with pytest.raises(ConfigError, match=rf"^data.chat_template={path}: it .*{message}") as err:
        prepare_data(data, ModelConfig())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("broken", ["unbalanced_for", "stray_braces", "raises", "undefined"])
def test_a_chat_template_that_cannot_render_is_refused_at_start(
    tmp_path: Path, broken: str
) -> None:
    # `mm1 serve` and `mm1 chat` resolve their template here before loading the model.
    from mm1.chat import resolve_chat_template
    from mm1.config import ConfigError

    source_text, message = BROKEN_TEMPLATES[broken]
    tok = Tokenizer.from_file(_tokenizer_dir(tmp_path / "tok", "qwen2"))
    path = tmp_path / "broken.jinja"
    path.write_text(source_text)
    with pytest.raises(ConfigError, match=rf"^--chat-template {path}: it .*{message}"):
        resolve_chat_template(tok, str(path))
    tok.chat_template = source_text  # the tokenizer's own
    with pytest.raises(ConfigError, match=rf"^the model's tokenizer's chat template .*{message}"):
        resolve_chat_template(tok, None)
    # A chat only renders: a template that never writes the answer still serves.
    answerless = BROKEN_TEMPLATES["no_answer"][0]
    path.write_text(answerless)
    assert resolve_chat_template(tok, str(path)).source == answerless


def test_builtin_and_real_templates_pass_the_check(case) -> None:
    name, ours, _ = case
    training = (ours.end_of_turn_tokens(), ours.eos_token)
    check_template(_template(name), ours.template_variables, training)
    check_template(_template(name), ours.template_variables)
    for builtin, source in BUILTIN_TEMPLATES.items():
        if all(ours.token_to_id(t) is not None for t in BUILTIN_TOKENS.get(builtin, ())):
            check_template(source, ours.template_variables, training)
            check_template(source, ours.template_variables)


def test_a_reasoning_template_is_told_apart_and_its_answers_read_after_the_block(case) -> None:
    """Qwen3's template writes `<think>…</think>`: a chat model on it answers after that block,
    and the SFT suite scores the text after it; the other templates' answers are read whole.
    A template whose generation prompt opens the block (as Qwen3-2507's thinking models'; here
    Qwen3's with that one change) leaves the model inside it."""
    name, ours, _ = case
    reasoning = chat_reasoning(_template(name), ours.template_variables)
    assert reasoning is (False if name == "qwen3" else None)
    fmt = PromptFormat(3)
    assert format_reasoning(ours, fmt) is reasoning
    answer = "<think>\n\n</think>\n\nyes\nA longer remark."
    prompter = SuitePrompter(ours, fmt, chat=True)
    got = prompter.answer("vqa", ours.encode(answer))
    assert got == ("yes" if name == "qwen3" else "<think>")
    if name == "qwen3":
        prompt = "'<|im_start|>assistant\\n' }}\n    {%- if enable_thinking"
        assert prompt in _template(name)
        opening = _template(name).replace(prompt, prompt.replace("\\n'", "\\n<think>\\n'"))
        assert chat_reasoning(opening, ours.template_variables) is True
        ours.chat_template = opening
        try:
            thinking = SuitePrompter(ours, fmt, chat=True)
            assert thinking.answer("caption", ours.encode("a cube\n</think>\n\nA red cube.")) == (
                "A red cube."
            )
        finally:
            ours.chat_template = _template(name)


def test_template_kwargs_are_transformers_apply_chat_template_kwargs(case) -> None:
    """`--chat-template-kwargs '{"enable_thinking": false}'` (and a server request's
    `chat_template_kwargs`): the prompt transformers writes with those keyword arguments. Qwen3's
    then closes an empty reasoning block itself, so the model answers at once; templates
    without the variable ignore it."""
    name, ours, hf = case
    question = [{"role": "user", "content": "How many dogs?"}]
    off = {"enable_thinking": False}
    fmt = PromptFormat(3)
    ids = tokenize_chat_prompt(question, [], ours, fmt, off)
    plain = tokenize_chat_prompt(question, [], ours, fmt)
    typed = [{"type": "text", "text": "How many dogs?"}]  # as a typed-parts template reads it
    messages = [{"role": "user", "content": typed}] if CASES[name][5] else question
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **off)
    text = ours.decode(ids, skip_special_tokens=False)
    assert text.removeprefix(ours.bos_token or "") == want.removeprefix(ours.bos_token or "")
    if name == "qwen3":
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert ids[: len(plain)] == plain and len(ids) > len(plain)
        variables = {**ours.template_variables, **off}
        assert chat_reasoning(_template(name), variables) is False  # an answer after a block
    else:
        assert ids == plain
