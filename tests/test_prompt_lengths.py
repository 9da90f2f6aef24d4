"""Prompt lengths against the training context (mm1.eval.prompt_lengths), on records shaped as
`evaluate` writes them."""

from __future__ import annotations

from mm1.eval.prompt_lengths import beyond_context, prompt_length_table, prompt_lengths


def _results() -> dict:
    def recs(*n: int) -> list[dict]:
        return [{"prompt_tokens": k} for k in n]

    return {
        "predictions": {
            "cap": {
                "8": {"0": recs(300, 380), "1": recs(320)},
                "4": {"0": recs(150, 170)},
                "0_plain": {"null": recs(19)},
            },
            "vqa": {"4": {"0": recs(256)}},
        }
    }


def test_prompt_lengths_pool_every_seed() -> None:
    out = prompt_lengths(_results())
    assert out["cap"]["8"] == (1000 / 3, 380)
    assert out["cap"]["4"] == (160, 170)
    assert out["vqa"]["4"] == (256, 256)


def test_beyond_context_names_only_runs_past_seq_len() -> None:
    # 256 tokens fit a 256-token context exactly; 380 do not
    assert beyond_context(_results(), 256) == ["cap 8-shot"]
    assert beyond_context(_results(), 255) == ["cap 8-shot", "vqa 4-shot"]
    assert beyond_context(_results(), 512) == []
    # 8 shots show 9 images: past a 6-image limit even when the tokens fit
    assert beyond_context(_results(), 512, max_images=6) == ["cap 8-shot"]
    assert beyond_context(_results(), 512, max_images=9) == []


def test_table_orders_shots_and_flags_the_overflow() -> None:
    lines = prompt_length_table(_results(), 256)
    rows = [line for line in lines[2:]]
    assert [r.split(" | ")[1] for r in rows] == ["0_plain", "4", "8", "4"]
    assert rows[2] == "| cap | 8 | 9 | 333 | 380 | **no** (+124 tokens) |"
    assert rows[1].endswith("| yes |")
    both = prompt_length_table(_results(), 256, max_images=4)
    assert both[4] == "| cap | 8 | 9 | 333 | 380 | **no** (+124 tokens, +5 images) |"
    assert both[3] == "| cap | 4 | 5 | 160 | 170 | **no** (+1 images) |"
