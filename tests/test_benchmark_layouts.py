"""`benchmarks.layouts` at tiny settings: every layout's child runs, and the crops and tokens it
reports are the layout's (speed itself is never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_layout_benchmark_reports_each_layouts_crops_and_tokens(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.common as common
    from benchmarks import layouts

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setenv("MM1_BENCH_THREADS", "1")
    tiny = ["--crop=32", "--patch=8", "--width=32", "--tokens=4", "--layers=1", "--reps=1"]
    rows = {}
    # One child process per layout and size: only the pairs checked below are run.
    for which, aspect in [(["single"], "1"), (["mm1", "anyres", "dynamic"], "2")]:
        layouts.main(["--sizes", "64", "--aspects", aspect, "--layouts", *which, *tiny])
        for r in json.loads((tmp_path / "layouts.json").read_text())["rows"]:
            rows[r["layout"], r["size"]] = r
    assert len(rows) == 4
    assert (rows["single", "64x64"]["crops"], rows["single", "64x64"]["tokens"]) == (1, 4)
    assert (rows["mm1", "128x64"]["crops"], rows["mm1", "128x64"]["tokens"]) == (5, 20)
    assert rows["anyres", "128x64"]["crops"] == 3  # base + the 2 x 1 canvas
    assert rows["dynamic", "128x64"]["tokens"] == 12  # 2 tiles and the overview
    assert all(r["images_per_s"] > 0 for r in rows.values())
