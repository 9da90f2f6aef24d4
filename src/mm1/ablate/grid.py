"""An ablation grid: a base config, axes of dotted overrides (a product grid or an explicit list
of cells), seeds as an axis; read from YAML, expanded into cells and checked before anything
trains (every cell's config loads and validates; no two cells share a config).

    study: connectors                  # the study's name (its directory and report title), plain
    base:
      config: ../demo.yaml             # relative to this file
      overrides: {train.steps: 800}    # dotted keys, applied to every cell
    seeds: [0, 1]                      # each sets train.seed and data.seed
    axes:                              # product grid, first axis outermost ...
      model.connector.type: [avgpool, attnpool]
      mixture:                         # ... an axis of named override sets
        - {label: "100/0/0", set: {data.sources: [...]}}
    cells:                             # ... or instead an explicit list of cells
      - {model.connector.type: avgpool}
      - {label: clean, set: {data.sources: [...]}}
    eval: {suites: [fewshot], overrides: {eval.max_examples: 64}}
    prepare: [{caption_splits: {...}}, {train: {...}}, {recaption: {...}}]  # see prepare.py
    table: {layout: fig4, group_by: model.connector.type, columns: [...]}  # columns: shown axes
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mm1.ablate.cell import SUITES
from mm1.ablate.prepare import PrepareStep, parse_prepare
from mm1.config import Config, ConfigError, config_identity, load_config, to_dict

TABLE_LAYOUTS = ("plain", "table1", "fig4", "fig5")
_GRID_KEYS = ("study", "base", "seeds", "axes", "cells", "eval", "table", "prepare")
# the keys each mapping section takes: a typo there would otherwise be silently ignored
_SECTION_KEYS = {
    "base": ("config", "overrides"),
    "eval": ("suites", "overrides"),
    "table": ("layout", "group_by", "columns"),
}
SEED_KEYS = ("train.seed", "data.seed")


@dataclass(frozen=True)
class Cell:
    """One configuration of the study at one seed."""

    id: str  # directory name under the study
    label: str  # the non-seed settings, readable ("type=avgpool, num_tokens=16")
    delta: dict[str, Any]  # dotted key -> value, the cell's changes to the base (seed included)
    settings: dict[str, str]  # axis name -> the value's label, for tables
    seed: int

    def overrides(self) -> list[str]:
        """The delta as command-line overrides."""
        return _as_args(self.delta)


def _as_args(overrides: dict[str, Any]) -> list[str]:
    """Dotted overrides as command-line ones (`key=<JSON>`; JSON is YAML, lists included)."""
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


@dataclass
class Grid:
    study: str
    path: Path
    base_config: Path
    base_overrides: dict[str, Any]
    seeds: list[int]
    axes: dict[str, list[Any]]  # as written: for the report's table layout
    cells: list[Cell]
    suites: list[str] | None  # None: the run's own eval section
    table: dict[str, Any] = field(default_factory=dict)
    prepare: list[PrepareStep] = field(default_factory=list)  # before the cells (prepare.py)

    def base_args(self) -> list[str]:
        return _as_args(self.base_overrides)

    def cell_config(self, cell: Cell, study_dir: str | Path) -> Config:
        """The cell's full config: base, base overrides, the cell's delta, its run dir."""
        run_dir = f"train.run_dir={json.dumps(str(Path(study_dir) / cell.id))}"
        return load_config(self.base_config, [*self.base_args(), *cell.overrides(), run_dir])

    def fingerprint(self) -> str:
        """What the study's results mean: the base config as resolved and every cell's delta."""
        base = config_identity(load_config(self.base_config, self.base_args()))
        record = {"base": base, "cells": [[c.id, c.delta] for c in self.cells]}
        record["suites"] = self.suites
        record["prepare"] = [[p.kind, p.options] for p in self.prepare]
        blob = json.dumps(record, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _err(path: Path, msg: str) -> ConfigError:
    return ConfigError(f"{path}: {msg}")


def _choices(path: Path, axis: str, values: Any) -> list[tuple[str, dict[str, Any]]]:
    """An axis's values as (label, overrides): a plain value sets the axis key itself; a
    `{label, set}` mapping sets its own keys."""
    if not isinstance(values, list) or not values:
        raise _err(path, f"axes.{axis}: give a non-empty list of values")
    out: list[tuple[str, dict[str, Any]]] = []
    for v in values:
        if isinstance(v, dict):
            if set(v) != {"label", "set"} or not isinstance(v["set"], dict) or not v["set"]:
                raise _err(path, f"axes.{axis}: a mapping value needs exactly `label` and `set`")
            choice = (str(v["label"]), dict(v["set"]))
        else:
            choice = (_show(v), {axis: v})
        # one label for two different settings would merge their results in the report
        twin = next((i for i, (lbl, sets) in enumerate(out) if lbl == choice[0]), None)
        if twin is not None and out[twin][1] != choice[1]:
            raise _err(
                path,
                f"axes.{axis}[{twin}] and axes.{axis}[{len(out)}]: both are labelled "
                f"{choice[0]!r} but set different values; give each its own label",
            )
        out.append(choice)
    return out


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _explicit(path: Path, cells: Any) -> list[tuple[dict[str, str], dict[str, Any]]]:
    if not isinstance(cells, list):
        raise _err(path, "cells: give a list of {dotted.key: value} mappings")
    out = []
    for i, c in enumerate(cells):
        if not isinstance(c, dict) or not c:
            raise _err(path, f"cells[{i}]: give a non-empty mapping of dotted.key: value")
        if set(c) == {"label", "set"} and isinstance(c["set"], dict):
            out.append(({"cell": str(c["label"])}, dict(c["set"])))
        else:
            out.append(({k: _show(v) for k, v in c.items()}, dict(c)))
    return out


def _short(key: str, depth: int) -> str:
    """The key's last `depth` dotted parts (`model.vision.layers`, 1: `layers`)."""
    return ".".join(key.split(".")[-depth:])


def _labels(
    path: Path, combos: list[tuple[dict[str, str], dict[str, Any]]], listed: bool
) -> list[str]:
    """Each configuration's label: `key=value` with each key's last part, lengthened (more of
    the dotted key) only where two configurations would otherwise share a label, since the
    report groups seeds by label. Two configurations whose labels stay the same are refused."""
    depth = [dict.fromkeys(settings, 1) for settings, _ in combos]

    def render(i: int) -> str:
        return ", ".join(f"{_short(k, depth[i][k])}={v}" for k, v in combos[i][0].items())

    def clashes() -> list[list[int]]:
        by_label: dict[str, list[int]] = {}
        for i in range(len(combos)):
            by_label.setdefault(render(i), []).append(i)
        # configurations with the same delta are one config: `_check_cells` refuses those
        return [g for g in by_label.values() if len({_canon(combos[i][1]) for i in g}) > 1]

    while True:
        grown = False
        for group in clashes():
            shown: dict[str, set[str]] = {}
            for i in group:
                for k in combos[i][0]:
                    shown.setdefault(_short(k, depth[i][k]), set()).add(k)
            for i in group:
                for k in combos[i][0]:
                    ambiguous = len(shown[_short(k, depth[i][k])]) > 1
                    if ambiguous and depth[i][k] < len(k.split(".")):
                        depth[i][k] += 1
                        grown = True
        if not grown:
            break
    for group in clashes():
        a, b = group[:2]
        # an explicit `{label, set}` cell's settings are {"cell": label}: name its label
        label = combos[a][0]["cell"] if list(combos[a][0]) == ["cell"] else render(a)
        where = f"cells[{a}] and cells[{b}]" if listed else f"configurations {a} and {b}"
        raise _err(
            path,
            f"{where}: both are labelled {label!r} but set different values; give each its "
            "own label",
        )
    return [render(i) for i in range(len(combos))]


def _canon(delta: dict[str, Any]) -> str:
    return json.dumps(delta, sort_keys=True, default=str)


def _section(path: Path, raw: dict[str, Any], name: str) -> dict[str, Any]:
    """A mapping section (base, eval, table), its keys checked against `_SECTION_KEYS`."""
    value = raw.get(name)
    if value is None:
        return {}
    known = _SECTION_KEYS[name]
    if not isinstance(value, dict):
        raise _err(path, f"{name}: give a mapping ({', '.join(known)}), not {_kind(value)}")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise _err(path, f"{name}.{unknown[0]}: not a key of {name}; known: {', '.join(known)}")
    return value


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean"}.get(type(value), repr(value))


def _study_name(path: Path, raw: dict[str, Any]) -> str:
    """The study's name: its directory under runs/ablations, so one plain name."""
    study = str(raw.get("study") or path.stem)
    if "/" in study or "\\" in study or study in (".", "..") or study.startswith("~"):
        raise _err(path, f"study={study!r}: give a plain name (no path separator, not . or ..)")
    return study


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:48] or "base"


def load_grid(path: str | Path) -> Grid:
    """Read and expand a grid file; every cell's config is loaded and validated here, so a bad
    key or value, an empty grid or two identical cells fail before anything trains."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise _err(path, f"not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise _err(path, "the top level must be a mapping (study, base, seeds, axes or cells)")
    unknown = sorted(set(raw) - set(_GRID_KEYS))
    if unknown:
        raise _err(path, f"{unknown[0]}: not a grid key; known: {', '.join(_GRID_KEYS)}")
    base = _section(path, raw, "base")
    if not base.get("config"):
        raise _err(path, "base.config: name the base config file (relative to the grid)")
    base_overrides = base.get("overrides") or {}
    if not isinstance(base_overrides, dict):
        raise _err(path, "base.overrides: give a mapping of dotted.key: value")
    base_config = (path.parent / str(base["config"])).resolve()
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
        raise _err(path, f"seeds={seeds!r}: give a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise _err(path, f"seeds={seeds}: a seed is listed twice")
    axes, cells_raw = raw.get("axes"), raw.get("cells")
    if axes is not None and cells_raw is not None:
        raise _err(path, "give either axes (a product grid) or cells (an explicit list)")
    if axes is None and cells_raw is None:
        raise _err(path, "empty grid: give axes or cells")
    if axes is not None:
        if not isinstance(axes, dict) or not axes:
            raise _err(path, "empty grid: axes has no axis")
        per_axis = [[(a, *c) for c in _choices(path, a, v)] for a, v in axes.items()]
        combos = []
        for combo in itertools.product(*per_axis):
            settings = {a: label for a, label, _ in combo}
            delta: dict[str, Any] = {}
            for _, _, sets in combo:
                delta.update(sets)
            combos.append((settings, delta))
    else:
        combos = _explicit(path, cells_raw)
        if not combos:
            raise _err(path, "empty grid: cells is empty")
    for key in SEED_KEYS:
        if any(key in d for _, d in combos) or key in base_overrides:
            raise _err(path, f"{key}: seeds are the `seeds` axis, not an override")
    if any("train.run_dir" in d for _, d in combos) or "train.run_dir" in base_overrides:
        # each cell trains in STUDY/CELL_ID; a run_dir of its own was replaced, unsaid, and
        # cells differing only in it trained the same config twice
        raise _err(path, "train.run_dir: the runner puts each cell in the study's directory")

    ev = _section(path, raw, "eval")
    suites = ev.get("suites")
    if suites is not None and (
        not isinstance(suites, list) or not suites or any(s not in SUITES for s in suites)
    ):
        raise _err(path, f"eval.suites={suites!r}: give a list from {', '.join(SUITES)}")
    # Evaluation settings go into every cell's config: `mm1 eval RUN` repeats them.
    eval_overrides = ev.get("overrides") or {}
    if not isinstance(eval_overrides, dict):
        raise _err(path, "eval.overrides: give a mapping of eval.key: value")
    eval_overrides = dict(eval_overrides)
    bad = [k for k in eval_overrides if not k.startswith("eval.")]
    if bad:
        raise _err(path, f"eval.overrides.{bad[0]}: only eval.* keys")
    clash = sorted(set(eval_overrides) & set(base_overrides))
    if clash:
        raise _err(path, f"{clash[0]}: set both in base.overrides and eval.overrides")
    # The cells' common config; when it fails, the base alone says which section is at fault
    # (the evaluation settings may also be what makes a base's eval section valid).
    try:
        load_config(base_config, _as_args({**base_overrides, **eval_overrides}))
    except ConfigError as merged_err:
        blame = f"base: {merged_err}"
        if eval_overrides:
            try:
                load_config(base_config, _as_args(base_overrides))
                blame = f"eval.overrides: {merged_err}"
            except ConfigError as base_err:
                blame = f"base: {base_err}"
        raise _err(path, blame) from None
    table = _section(path, raw, "table")
    layout = table.get("layout", "plain")
    if layout not in TABLE_LAYOUTS:
        raise _err(path, f"table.layout={layout!r}: one of {', '.join(TABLE_LAYOUTS)}")

    study = _study_name(path, raw)
    cells: list[Cell] = []
    for (settings, delta), label in zip(
        combos, _labels(path, combos, listed=axes is None), strict=True
    ):
        digest = hashlib.sha256(json.dumps(delta, sort_keys=True).encode()).hexdigest()[:6]
        for seed in seeds:
            full = {**delta, **dict.fromkeys(SEED_KEYS, seed)}
            cid = f"{_slug('_'.join(settings.values()))}-s{seed}-{digest}"
            cells.append(Cell(cid, label, full, settings, seed))
    grid = Grid(
        study,
        path,
        base_config,
        {**base_overrides, **eval_overrides},
        list(seeds),
        dict(axes) if axes else {"cell": [s["cell"] for s, _ in combos if "cell" in s]},
        cells,
        suites,
        dict(table),
        parse_prepare(raw.get("prepare"), path),
    )
    _check_cells(grid)
    _check_table(grid)
    return grid


def _check_table(grid: Grid) -> None:
    """`table.columns` / `table.group_by` must name settings the cells have."""
    names = {a for c in grid.cells for a in c.settings}
    columns = grid.table.get("columns")
    if columns is not None and (not isinstance(columns, list) or not columns):
        raise _err(grid.path, "table.columns: give a list of axis names")
    for key in [*(columns or []), *([grid.table["group_by"]] if "group_by" in grid.table else [])]:
        if key not in names:
            raise _err(grid.path, f"table: {key!r} is no axis; axes: {', '.join(sorted(names))}")


def _check_cells(grid: Grid) -> None:
    """Load every cell's config (naming the cell on a bad key or value) and reject two cells
    whose resolved configs are the same."""
    seen: dict[str, Cell] = {}
    for cell in grid.cells:
        try:
            cfg = load_config(grid.base_config, [*grid.base_args(), *cell.overrides()])
        except ConfigError as err:
            raise _err(grid.path, f"cell {cell.id} ({cell.label}): {err}") from None
        resolved = json.dumps(to_dict(cfg), sort_keys=True, default=str)
        twin = seen.get(resolved)
        if twin is not None:
            if twin.id == cell.id:  # the same settings listed twice
                raise _err(grid.path, f"cell {cell.id} ({cell.label}) is listed twice")
            raise _err(
                grid.path, f"cells {twin.id} and {cell.id} have the same config ({cell.label})"
            )
        seen[resolved] = cell
