"""Chat-template behaviour the main tests left unpinned (found by mutation testing): template
selection and loading, rendering against transformers' `apply_chat_template`, and the learned
regions `training_text` finds."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jinja2
import pytest

from mm1.data.chat_template import (
    BUILTIN_TEMPLATES,
    check_template,
    is_jinja,
    load_chat_template,
    render,
    select_template,
    template_config_value,
    template_from_option,
    text_pieces,
    training_text,
)

VARS = {"bos_token": "<s>", "eos_token": "</s>"}


# -- selection and loading ----------------------------------------------------------------------


def test_a_named_tokenizer_template_wins_over_a_builtin_of_the_same_name() -> None:
    own = {"default": "D", "chatml": "{{ 'mine' }}"}
    assert select_template(own, "chatml") == ("chatml", "{{ 'mine' }}")
    assert select_template("{{ 'x' }}", "chatml") == ("chatml", BUILTIN_TEMPLATES["chatml"])


def test_several_templates_without_a_default_must_be_named() -> None:
    with pytest.raises(ValueError, match="none is 'default': name one"):
        select_template({"rag": "R", "tools": "T"})
    assert select_template({"default": "D", "rag": "R"}) == ("default", "D")
    assert select_template("S") == ("tokenizer", "S")
    with pytest.raises(ValueError, match="has no chat template"):
        select_template(None)


@pytest.mark.parametrize("source", ["{{ messages[0]['content'] }}", "{% if true %}x{% endif %}"])
def test_an_expression_or_a_statement_alone_is_a_jinja_source(source: str) -> None:
    assert is_jinja(source)
    assert select_template(None, source) == ("custom", source)
    assert not is_jinja("chatml")


def test_template_option_needs_a_jinja_suffix(tmp_path: Path) -> None:
    txt = tmp_path / "mine.txt"
    txt.write_text("{{ 'x' }}")
    with pytest.raises(ValueError, match="neither a built-in chat template"):
        template_from_option(str(txt))
    jinja_file = tmp_path / "mine.jinja"
    jinja_file.write_text("{{ 'x' }}")
    assert template_from_option(str(jinja_file)) == ("mine.jinja", "{{ 'x' }}")


def test_a_processors_chat_template_json_wins_over_tokenizer_config(tmp_path: Path) -> None:
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "P"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "T"}))
    assert load_chat_template(tmp_path) == "P"
    (tmp_path / "chat_template.json").write_text(json.dumps({"other": 1}))
    assert load_chat_template(tmp_path) == "T"


@pytest.mark.parametrize(
    "value", [[{"name": "default", "template": "A"}, "B"], {}, {"default": "A"}, 3]
)
def test_a_malformed_config_template_is_refused(tmp_path: Path, value) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": value}))
    with pytest.raises(ValueError, match="neither a string nor a list of named templates"):
        load_chat_template(tmp_path)


def test_named_templates_round_trip_through_the_config_form(tmp_path: Path) -> None:
    named = {"default": "A", "rag": "B"}
    value = template_config_value(named)
    assert value == [{"name": "default", "template": "A"}, {"name": "rag", "template": "B"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": value}))
    assert load_chat_template(tmp_path) == named
    assert template_config_value("S") == "S"


# -- rendering, against transformers --------------------------------------------------------------

RENDER_CASES = {
    "blocks_and_indentation": (
        "{% for m in messages %}\n"
        "  {% if m['role'] == 'user' %}\n"
        "    U: {{ m['content'] }}\n"
        "  {% else %}\n"
        "    A: {{ m['content'] }}{{ eos_token }}\n"
        "  {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}A:{% endif %}",
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ),
    "tojson_unicode": (
        "{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}",
        [{"role": "user", "content": "two dogs ✓ <b>&"}],
    ),
    "none_keys_dropped": (
        "{% for m in messages %}{{ m | tojson }}|{{ m['name'] is defined }}{% endfor %}",
        [{"role": "user", "content": "Hi", "name": None}],
    ),
    "reasoning_aliases": (
        "{% for m in messages %}{{ m['thinking'] }}/{{ m['reasoning_content'] }}"
        "|{{ m | tojson }}{% endfor %}",
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo", "reasoning_content": "think"},
            {"role": "assistant", "content": "Yo", "reasoning": "older"},
        ],
    ),
    "tools_and_documents_are_none": (
        "{{ tools is none }} {{ documents is none }} {{ messages | length }}",
        [{"role": "user", "content": "Hi"}],
    ),
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.mark.parametrize("name", list(RENDER_CASES))
@pytest.mark.parametrize("gen", [False, True])
def test_rendering_equals_transformers(hf_tokenizer, name: str, gen: bool) -> None:
    source, messages = RENDER_CASES[name]
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=source, add_generation_prompt=gen, tokenize=False
    )
    variables = {**VARS, "unk_token": "<unk>"}
    assert render(source, messages, gen, variables)[0] == expected


def test_a_rich_object_is_seen_by_its_type_name() -> None:
    class Blob:
        secret = "x"

    source = "{{ messages[0]['content'][0]['image'] }}"
    messages = [{"role": "user", "content": [{"type": "image", "image": Blob()}]}]
    assert render(source, messages, False, VARS)[0] == "<Blob>"


@pytest.mark.parametrize(
    "source",
    [
        "{% set ns = namespace(_hidden=1) %}{{ 'x' }}",
        "{% set ns = namespace(a=1) %}{% set ns._hidden = 2 %}{{ ns.a }}",
    ],
)
def test_namespace_refuses_underscore_names(source: str) -> None:
    with pytest.raises(jinja2.exceptions.SecurityError, match="underscore attributes"):
        render(source, [{"role": "user", "content": "Hi"}], False, VARS)


def test_an_empty_conversation_is_refused() -> None:
    with pytest.raises(ValueError, match="empty conversation"):
        render(BUILTIN_TEMPLATES["plain"], [], True, VARS)


# -- check_template -----------------------------------------------------------------------------


def test_check_template_tries_a_later_turn_too() -> None:
    one_turn_only = (
        "{% if messages | length > 1 %}{{ raise_exception('one turn only') }}{% endif %}"
        "{{ messages[0]['content'] }}"
    )
    with pytest.raises(ValueError, match="fails to render a conversation: one turn only"):
        check_template(one_turn_only, VARS)


# -- training_text --------------------------------------------------------------------------------


def test_text_pieces_are_the_text_parts_only() -> None:
    parts = [
        {"type": "image"},
        {"type": "image_url", "image_url": "x.png"},
        {"type": "text", "text": "a"},
        {"type": "text", "text": "b"},
    ]
    assert text_pieces(parts) == ["a", "b"]
    assert text_pieces("plain") == ["plain"]


def _conv(*turns: str) -> list[dict]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def _learned(text: str, regions: list[tuple[int, int]]) -> list[str]:
    return [text[s:e] for s, e in regions]


def test_adjacent_generation_marks_of_one_turn_are_one_region() -> None:
    source = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{% for p in m['content'] %}{% generation %}{{ p['text'] }}{% endgeneration %}"
        "{% endfor %}<|end|>{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    )
    parts = [{"type": "text", "text": "A small "}, {"type": "text", "text": "cube."}]
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": parts}]
    text, regions, appended = training_text(source, messages, VARS, ("<|end|>",), "</s>")
    assert text == "Q\nA small cube.<|end|>"
    assert _learned(text, regions) == ["A small cube.<|end|>"] and not appended


def test_an_empty_generation_mark_is_no_region() -> None:
    source = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% generation %}{% endgeneration %}{{ '\\n' }}{% endif %}"
        "{% endfor %}"
    )
    text, regions, appended = training_text(source, _conv("Q", "A"), VARS, ("<|end|>",), "</s>")
    assert text == "Q\nA<|end|>"
    assert _learned(text, regions) == ["A<|end|>"] and not appended


def test_a_mark_that_holds_the_end_token_gets_no_eos() -> None:
    source = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
        "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    )
    messages = _conv("Q", "A", "Q2", "B")
    text, regions, appended = training_text(source, messages, VARS, ("<|end|>",), "</s>")
    assert text == "Q\nA<|end|>Q2\nB<|end|>"
    assert _learned(text, regions) == ["A<|end|>", "B<|end|>"] and not appended


def test_eos_goes_right_after_the_content_not_after_trailing_whitespace() -> None:
    source = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{% generation %}{{ m['content'] }}\n{% endgeneration %}"
        "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    )
    messages = _conv("Q", "A", "Q2", "B")
    text, regions, appended = training_text(source, messages, VARS, ("<|end|>",), "</s>")
    assert appended
    assert text == "Q\nA</s>\nQ2\nB</s>\n"
    assert _learned(text, regions) == ["A</s>", "B</s>"]


def test_whitespace_between_content_and_end_token_is_learned() -> None:
    source = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n<|end|>\n{% endfor %}"
    source += "{% if add_generation_prompt %}assistant:{% endif %}"
    text, regions, appended = training_text(source, _conv("Q", "A"), VARS, ("<|end|>",), "</s>")
    assert text == "user: Q\n<|end|>\nassistant: A\n<|end|>\n"
    assert _learned(text, regions) == [" A\n<|end|>"] and not appended


def test_the_longest_end_token_is_learned() -> None:
    source = "{% for m in messages %}{{ m['content'] }}<|end|><|pad|>{% endfor %}"
    ends = ("<|end|>", "<|end|><|pad|>")
    text, regions, _ = training_text(source, _conv("Q", "A"), VARS, ends, "</s>")
    assert _learned(text, regions)[0].endswith("A<|end|><|pad|>")


def test_content_is_located_after_the_prompt_even_when_the_user_said_it() -> None:
    source = BUILTIN_TEMPLATES["plain"]
    messages = _conv("Is it green? green", "green", "And the cube?", "green")
    text, regions, appended = training_text(source, messages, VARS, ("</s>",), "</s>")
    assert not appended
    assert (
        text
        == "User: Is it green? green\nAssistant: green</s>User: And the cube?\nAssistant: green</s>"
    )
    assert _learned(text, regions) == [" green</s>", " green</s>"]


def test_content_the_template_trims_is_still_found() -> None:
    source = BUILTIN_TEMPLATES["llama3"]
    messages = _conv("Q", "  green \n")
    text, regions, appended = training_text(source, messages, VARS, ("<|eot_id|>",), "</s>")
    assert not appended
    assert _learned(text, regions) == ["green<|eot_id|>"]


def test_a_prompt_shorter_than_the_previous_turn_is_not_a_prefix() -> None:
    # The generation prompt renders only the header "H": a prefix of the text, but it ends
    # before the first answer does, so the second answer is searched after the first.
    source = (
        "H{% if not add_generation_prompt %}"
        "{% for m in messages %}{{ m['content'] }}|{% endfor %}{% endif %}"
    )
    messages = _conv("q1", "a1", "q2", "a2")
    text, regions, _ = training_text(source, messages, VARS, ("|",), "</s>")
    assert text == "Hq1|a1|q2|a2|"
    learned = _learned(text, regions)
    assert learned[1] == "a2|"
    assert all(e1 <= s2 for (_, e1), (s2, _) in itertools.pairwise(regions))


def test_a_blank_assistant_turn_is_an_error() -> None:
    # The text starts with the message count, so no generation prompt is its prefix.
    source = "{{ messages | length }}:{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    assert training_text(source, _conv("Q", "A"), VARS, ("|",), "</s>")[1] == [(4, 6)]
    with pytest.raises(ValueError, match="message 1: empty assistant turn"):
        training_text(source, _conv("Q", "   "), VARS, ("|",), "</s>")
