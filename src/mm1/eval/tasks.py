"""Few-shot evaluation tasks read from local files in the formats users bring (REFERENCE §3).

Two kinds of task:

- `CaptionTask`: COCO-captions JSON (`images` with `id` and `file_name`, `annotations` with
  `image_id` and `caption`) plus an image folder. COCO, NoCaps and TextCaps (converted to that
  layout, as pycocoevalcap expects) all load this way. One query per image; scored by CIDEr-D.
- `VQATask`: VQAv2 questions JSON (`questions`: `image_id`, `question`, `question_id`) plus
  annotations JSON (`annotations`: `question_id`, `answers` [10 x {`answer`}]) plus an image folder.
  VQAv2, TextVQA, VizWiz, OK-VQA and GQA (converted) load this way. One query per question; scored
  by VQA accuracy.

Each task has a query split (what is scored) and an optional support split (where few-shot
demonstrations come from; OpenFlamingo draws them from the training split). A task is described
by a `TaskSpec` (name, kind, file paths) and registered by name; the synthetic world's evaluation
splits are available as `synth_coco` and `synth_vqa` (queries = world `val`, demonstrations =
world `support`) once a world directory is given.

Images are found per example: a COCO `images` entry's `file_name`; for VQA a question's own
`file_name` / `image` / `image_path` key when it has one (TextVQA / VizWiz conversions do), else
`image_pattern` (e.g. `"COCO_val2014_{image_id:012d}.jpg"`), else the file in the image folder
whose name ends in the image id's digits (`COCO_val2014_000000391895.jpg`,
`world_val_000000000001.jpg`). A task with missing images is an error that says how many are
missing and names a few: an evaluation never silently scores a subset.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mm1.config import ConfigError
from mm1.eval.metrics import cider, ptb_tokenize_corpus, vqa_accuracy_corpus
from mm1.eval.task_files import Example, WrongFileError, load_coco_captions, load_vqa

TASK_KINDS = ("caption", "vqa")
# The SFT suite's kinds (`mm1.eval.suite_tasks`): POPE yes/no, multi-image VQA, long answers.
SUITE_KINDS = ("pope", "multi", "long")
# The files each kind's splits need.
_NEEDS = {
    "caption": ("captions",),
    "vqa": ("questions", "annotations"),
    "multi": ("questions", "annotations"),
    "pope": ("questions",),
    "long": ("questions", "references"),
}


@contextmanager
def _split_files(spec: TaskSpec, split: str) -> Iterator[None]:
    """A file of the wrong kind is a mistake in the task spec (the user's): a one-line
    `ConfigError` naming the task and its key."""
    try:
        yield
    except WrongFileError as err:
        raise ConfigError(f"task {spec.name!r}: {split}.{err.key}: {err}") from None


@dataclass(frozen=True)
class SplitFiles:
    """The files of one split. Captions: `captions` (COCO captions JSON). VQA: `questions` and
    `annotations` (VQAv2 JSONs). SFT suite kinds: `questions` (POPE jsonl; LLaVA-Bench
    questions jsonl; VQAv2 with `images` lists) and `annotations` or `references` (LLaVA-Bench
    style jsonl of reference answers). All: `image_dir`."""

    image_dir: str | Path
    captions: str | Path | None = None
    questions: str | Path | None = None
    annotations: str | Path | None = None
    references: str | Path | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], root: str | Path | None = None) -> SplitFiles:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(
                f"unknown split keys {sorted(unknown)}; expected image_dir, "
                "captions, questions, annotations, references"
            )
        return cls(**{k: _rooted(v, root) for k, v in d.items()})


@dataclass(frozen=True)
class TaskSpec:
    """How to load a task: its name, kind ("caption" or "vqa"), the query split's files and
    optionally the support split's (demonstrations). `image_pattern` names image files from the
    image id for VQA files that carry no file name; `vqa_normalize` is the VQA accuracy variant
    ("official" or "always", see `mm1.eval.metrics.vqa_accuracy`)."""

    name: str
    kind: str
    query: SplitFiles
    support: SplitFiles | None = None
    image_pattern: str | None = None
    vqa_normalize: str = "official"
    # New tokens generated per answer for this task (OpenFlamingo: 10 for TextVQA); None = the
    # evaluator's default for the kind (20 captions, 5 VQA).
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS + SUITE_KINDS:
            raise ValueError(
                f"task {self.name!r}: kind must be one of {TASK_KINDS + SUITE_KINDS}, "
                f"got {self.kind!r}"
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"task {self.name!r}: max_new_tokens must be >= 1")
        for split_name, split in (("query", self.query), ("support", self.support)):
            if split is None:
                continue
            missing = [k for k in _NEEDS[self.kind] if getattr(split, k) is None]
            if missing:
                raise ValueError(
                    f"{self.kind} task {self.name!r}: the {split_name} split needs "
                    + " and ".join(f"`{k}`" for k in _NEEDS[self.kind])
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], root: str | Path | None = None) -> TaskSpec:
        """From a plain dict (e.g. a YAML config section); relative paths are taken under `root`.

        `{"name": "coco", "kind": "caption",
          "query": {"captions": "captions_val2014.json", "image_dir": "val2014"},
          "support": {"captions": "captions_train2014.json", "image_dir": "train2014"}}`
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a task is a mapping of keys (name, kind, query, ...), got {d!r}")
        keys = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(keys))
        missing = [k for k in ("name", "kind", "query") if k not in d]
        if unknown or missing:
            problems = [f"unknown key(s) {unknown}"] if unknown else []
            problems += [f"missing key(s) {missing}"] if missing else []
            raise ValueError(f"{'; '.join(problems)}; the keys are {', '.join(keys)}")
        d = dict(d)
        query = SplitFiles.from_dict(d.pop("query"), root)
        support = d.pop("support", None)
        return cls(
            query=query,
            support=None if support is None else SplitFiles.from_dict(support, root),
            **d,
        )

    def load(self) -> Task:
        """The loaded task; the SFT suite's kinds load with `mm1.eval.suite_tasks`."""
        if self.kind in SUITE_KINDS:
            raise ValueError(
                f"task {self.name!r} is an SFT-suite task ({self.kind}): evaluate it with "
                "`mm1 eval RUN --suite FILE` (mm1.eval.suite)"
            )
        cls = CaptionTask if self.kind == "caption" else VQATask
        return cls.from_spec(self)


def _rooted(value: Any, root: str | Path | None) -> Any:
    if value is None or root is None:
        return value
    p = Path(value)
    return p if p.is_absolute() else Path(root) / p


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


@dataclass
class Task(ABC):
    """A loaded task: its queries, its demonstrations (support) and how it is scored."""

    name: str
    query: list[Example]
    support: list[Example] = field(default_factory=list)
    kind: str = ""
    metric: str = ""
    max_new_tokens: int | None = None  # None: the evaluator's default for the kind

    def references(self, examples: Sequence[Example] | None = None) -> dict[str, list[str]]:
        return {e.id: list(e.references) for e in (self.query if examples is None else examples)}

    @abstractmethod
    def score(
        self, predictions: Mapping[str, str], examples: Sequence[Example] | None = None
    ) -> tuple[float, dict[str, float]]:
        """Corpus score ×100 of `predictions` ({example id: text}) over `examples` (default all
        queries), and the per-example scores ×100."""


@dataclass
class CaptionTask(Task):
    kind: str = "caption"
    metric: str = "CIDEr"

    @classmethod
    def from_files(
        cls,
        name: str,
        captions: str | Path,
        image_dir: str | Path,
        support_captions: str | Path | None = None,
        support_image_dir: str | Path | None = None,
    ) -> CaptionTask:
        support = None
        if support_captions is not None:
            support = SplitFiles(support_image_dir or image_dir, captions=support_captions)
        spec = TaskSpec(name, "caption", SplitFiles(image_dir, captions=captions), support)
        return cls.from_spec(spec)

    @classmethod
    def from_spec(cls, spec: TaskSpec) -> CaptionTask:
        with _split_files(spec, "query"):
            query = load_coco_captions(spec.query.captions, spec.query.image_dir, spec.name)
        support = []
        if spec.support is not None:
            with _split_files(spec, "support"):
                support = load_coco_captions(
                    spec.support.captions, spec.support.image_dir, f"{spec.name} (support)"
                )
        return cls(spec.name, query, support, max_new_tokens=spec.max_new_tokens)

    def score(
        self, predictions: Mapping[str, str], examples: Sequence[Example] | None = None
    ) -> tuple[float, dict[str, float]]:
        """CIDEr-D ×100 over exactly `examples` (the IDF depends on the set scored), after PTB
        tokenization of references and candidates, as pycocoevalcap's COCOEvalCap does."""
        refs = ptb_tokenize_corpus(self.references(examples))
        cands = ptb_tokenize_corpus({k: [predictions[k]] for k in refs})
        corpus, per = cider(refs, {k: v[0] for k, v in cands.items()})
        return 100.0 * corpus, {k: 100.0 * v for k, v in per.items()}


@dataclass
class VQATask(Task):
    kind: str = "vqa"
    metric: str = "VQA accuracy"
    normalize: str = "official"

    @classmethod
    def from_files(
        cls,
        name: str,
        questions: str | Path,
        annotations: str | Path,
        image_dir: str | Path,
        support_questions: str | Path | None = None,
        support_annotations: str | Path | None = None,
        support_image_dir: str | Path | None = None,
        image_pattern: str | None = None,
        normalize: str = "official",
    ) -> VQATask:
        support = None
        if support_questions is not None or support_annotations is not None:
            support = SplitFiles(
                support_image_dir or image_dir,
                questions=support_questions,
                annotations=support_annotations,
            )
        spec = TaskSpec(
            name,
            "vqa",
            SplitFiles(image_dir, questions=questions, annotations=annotations),
            support,
            image_pattern=image_pattern,
            vqa_normalize=normalize,
        )
        return cls.from_spec(spec)

    @classmethod
    def from_spec(cls, spec: TaskSpec) -> VQATask:
        q = spec.query
        with _split_files(spec, "query"):
            query = load_vqa(q.questions, q.annotations, q.image_dir, spec.name, spec.image_pattern)
        support = []
        if spec.support is not None:
            s = spec.support
            with _split_files(spec, "support"):
                support = load_vqa(
                    s.questions,
                    s.annotations,
                    s.image_dir,
                    f"{spec.name} (support)",
                    spec.image_pattern,
                )
        return cls(
            spec.name,
            query,
            support,
            max_new_tokens=spec.max_new_tokens,
            normalize=spec.vqa_normalize,
        )

    def score(
        self, predictions: Mapping[str, str], examples: Sequence[Example] | None = None
    ) -> tuple[float, dict[str, float]]:
        """VQA accuracy ×100 (the official script's rounding to 2 decimals)."""
        answers = self.references(examples)
        overall, per = vqa_accuracy_corpus(
            {k: predictions[k] for k in answers}, answers, self.normalize
        )
        return overall, {k: 100.0 * v for k, v in per.items()}


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

TASKS: dict[str, TaskSpec] = {}
SYNTHETIC_TASKS = ("synth_coco", "synth_vqa")


def register_task(spec: TaskSpec | Mapping[str, Any], *, overwrite: bool = False) -> TaskSpec:
    """Register a task by its files (a `TaskSpec` or its dict form); returns the spec."""
    if not isinstance(spec, TaskSpec):
        spec = TaskSpec.from_dict(spec)
    if spec.name in TASKS and not overwrite and TASKS[spec.name] != spec:
        raise ValueError(f"task {spec.name!r} is already registered (pass overwrite=True)")
    TASKS[spec.name] = spec
    return spec


def read_task_specs(path: str | Path, what: str = "task file") -> list[TaskSpec]:
    """The `TaskSpec`s of a YAML list of task dicts (paths relative to the file). Mistakes are
    one-line `ConfigError`s naming the file and the task's position; a missing file is a
    `FileNotFoundError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        entries = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: a {what} is a YAML list of tasks (- name: ...)")
    specs = []
    for i, d in enumerate(entries):
        try:
            specs.append(TaskSpec.from_dict(d, root=path.parent))
        except (ValueError, KeyError, TypeError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise ConfigError(f"{path}: task {i + 1}: {msg}") from None
    return specs


def register_task_file(path: str | Path) -> list[str]:
    """Register every task of a YAML task file (`read_task_specs`), replacing tasks of the same
    name; returns their names in file order. The synthetic names are reserved: evaluation
    builds those from the world, so a user task of that name would silently not run."""
    specs = read_task_specs(path)
    names = [spec.name for spec in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # a later one would replace the earlier, and the evaluation refuse the pair
        raise ConfigError(
            f"{path}: task names must be distinct; named more than once: {', '.join(twice)}"
        )
    for spec in specs:
        if spec.name in SYNTHETIC_TASKS:
            raise ConfigError(
                f"{path}: task {spec.name!r}: that name is reserved for a built-in synthetic "
                f"task ({', '.join(SYNTHETIC_TASKS)}); rename it"
            )
    return [register_task(spec, overwrite=True).name for spec in specs]


def synthetic_task_specs(world: str | Path) -> dict[str, TaskSpec]:
    """`synth_coco` and `synth_vqa` of a synthetic world directory (see
    `mm1.data.synthetic.write_world`): queries from its `val` split, demonstrations from
    `support`."""
    from mm1.data.synthetic import WorldManifest  # data layer; only needed for the world

    manifest = WorldManifest.load(world)
    splits = {}
    for split in ("val", "support"):
        e = manifest.eval[split]
        splits[split] = {
            "caption": SplitFiles(
                manifest.path(e["image_dir"]), captions=manifest.path(e["coco_captions"])
            ),
            "vqa": SplitFiles(
                manifest.path(e["image_dir"]),
                questions=manifest.path(e["vqa_questions"]),
                annotations=manifest.path(e["vqa_annotations"]),
            ),
        }
    return {
        "synth_coco": TaskSpec(
            "synth_coco", "caption", splits["val"]["caption"], splits["support"]["caption"]
        ),
        "synth_vqa": TaskSpec("synth_vqa", "vqa", splits["val"]["vqa"], splits["support"]["vqa"]),
    }


def register_synthetic_world(world: str | Path) -> list[str]:
    """Register `synth_coco` and `synth_vqa` for `world` (replacing earlier ones)."""
    specs = synthetic_task_specs(world)
    for spec in specs.values():
        register_task(spec, overwrite=True)
    return list(specs)


def list_tasks() -> list[str]:
    return sorted(TASKS)


def load_task(task: str | TaskSpec | Task, *, world: str | Path | None = None) -> Task:
    """A loaded task from a registered name, a spec, or a task (returned as is). The synthetic
    names need `world` unless they were registered with `register_synthetic_world`."""
    if isinstance(task, Task):
        return task
    if isinstance(task, TaskSpec):
        return task.load()
    if world is not None and task in SYNTHETIC_TASKS:
        return synthetic_task_specs(world)[task].load()
    if task in TASKS:
        return TASKS[task].load()
    hint = " (synthetic tasks need world=...)" if task in SYNTHETIC_TASKS else ""
    known = ", ".join(sorted(set(TASKS) | set(SYNTHETIC_TASKS)))
    raise KeyError(
        f"unknown task {task!r}{hint}; known: {known}; register real tasks with register_task"
    )


def load_tasks(
    tasks: Sequence[str | TaskSpec | Task], *, world: str | Path | None = None
) -> list[Task]:
    return [load_task(t, world=world) for t in tasks]
