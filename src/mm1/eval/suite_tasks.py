"""The SFT evaluation suite's tasks: loading them from the files users bring, and scoring.

Five kinds of file, each the public benchmark's own layout (or its usual conversion), described
by a `TaskSpec` (`mm1.eval.tasks`) in a task file (YAML list; paths relative to it):

- `vqa` (VQAv2 / TextVQA): VQAv2 `questions` + `annotations` JSONs and `image_dir`, as
  `mm1.eval.tasks.load_vqa` reads them. Scored by VQA accuracy.
- `multi` (multi-image questions): the same two JSONs, each question naming its pictures in
  order with `images: [file, ...]`. Scored by VQA accuracy (and, for both VQA kinds, the
  accuracy per `answer_type` of the annotations, as the official evaluation reports it).
- `pope` (POPE): `questions` is POPE's jsonl, one {"question_id", "image", "text", "label":
  "yes"|"no"} per line (optional "category": random / popular / adversarial). Scored by F1
  (headline), accuracy, precision, recall and yes-ratio (`mm1.eval.metrics.pope_scores`), and
  the accuracy per category (`accuracy_random`, ...) where the lines name one.
- `long` (LLaVA-Bench style): `questions` is LLaVA-Bench's questions jsonl ({"question_id",
  "image", "text", "category"}), `references` a jsonl of {"question_id", "text"}, one line per
  reference answer (several lines per question allowed). Scored by CIDEr (headline) and ROUGE-L,
  PTB-tokenized as pycocoevalcap does.

Short answers (vqa, multi) are put through the VQA answer normalisation before the official
scoring (`vqa_normalize`: case, punctuation, number words, articles), as LLaVA's answer
processor does before submission; the references are the official evaluator's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm1.config import ConfigError
from mm1.eval.metrics import (
    cider,
    pope_scores,
    ptb_tokenize_corpus,
    rouge_l,
    vqa_accuracy_corpus,
    vqa_normalize,
)
from mm1.eval.tasks import SUITE_KINDS, SplitFiles, TaskSpec, load_vqa, read_task_specs

SHORT_KINDS = ("vqa", "pope", "multi")  # answered with a word or phrase
HEADLINE = {"vqa": "VQA accuracy", "multi": "VQA accuracy", "pope": "F1", "long": "CIDEr"}


@dataclass(frozen=True)
class SuiteExample:
    """One question: its images in order, the references (VQA answers, the POPE label, or the
    reference answers) and the answer a demonstration shows (`target`)."""

    id: str
    images: tuple[Path, ...]
    question: str
    references: tuple[str, ...]
    target: str
    category: str | None = None


@dataclass
class SuiteTask:
    name: str
    kind: str
    query: list[SuiteExample]
    support: list[SuiteExample] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return HEADLINE[self.kind]

    def score(
        self, predictions: Mapping[str, str], examples: Sequence[SuiteExample]
    ) -> tuple[dict[str, float], dict[str, float]]:
        """({metric: corpus score ×100}, headline first; {example id: its score ×100})."""
        refs = {e.id: list(e.references) for e in examples}
        preds = {k: predictions[k] for k in refs}
        if self.kind in ("vqa", "multi"):
            normed = {k: vqa_normalize(v) for k, v in preds.items()}
            overall, per = vqa_accuracy_corpus(normed, refs)
            # The official VQA evaluation's accuracy per answer type, rounded as it rounds.
            by_type = _by_category(examples, per)
            scores = {self.metric: overall}
            scores.update({f"accuracy_{t}": round(100 * v, 2) for t, v in by_type.items()})
            return scores, {k: 100.0 * v for k, v in per.items()}
        if self.kind == "pope":
            labels = {k: v[0] for k, v in refs.items()}
            scores = pope_scores(preds, labels)
            from mm1.eval.metrics import pope_answer

            per = {k: 100.0 * (pope_answer(preds[k]) == labels[k]) for k in labels}
            # POPE reports each kind of negative apart: random ones can be told by colour
            # alone, adversarial ones need the binding of colour and shape.
            for category, value in _by_category(examples, per).items():
                scores[f"accuracy_{category}"] = value
            return {"F1": scores.pop("f1"), **scores}, per
        tok_refs = ptb_tokenize_corpus(refs)
        tok_cands = {k: v[0] for k, v in ptb_tokenize_corpus({k: [preds[k]] for k in refs}).items()}
        c, per_c = cider(tok_refs, tok_cands)
        r, _ = rouge_l(tok_refs, tok_cands)
        return {"CIDEr": 100.0 * c, "ROUGE-L": 100.0 * r}, {k: 100.0 * v for k, v in per_c.items()}


def _by_category(examples: Sequence[SuiteExample], per: Mapping[str, float]) -> dict[str, float]:
    """The mean of `per` over the examples of each category, in order of first appearance;
    empty when no example has one."""
    groups: dict[str, list[float]] = {}
    for e in examples:
        if e.category:
            groups.setdefault(e.category, []).append(per[e.id])
    return {c: sum(v) / len(v) for c, v in groups.items()}


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def _jsonl(path: str | Path, task: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task {task!r}: {p} does not exist")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{p}:{n}: not a JSON line ({err.msg})") from None
    return rows


def _need(row: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")


def _check_images(task: str, examples: Sequence[SuiteExample]) -> None:
    missing = sorted({p.name for e in examples for p in e.images if not p.is_file()})
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"task {task!r}: {len(missing)} images are missing: {shown}. Fix the image folder "
            "(or the files) rather than scoring a subset."
        )
    if not examples:
        raise ValueError(f"task {task!r}: no questions")


def _load_split(spec: TaskSpec, split: SplitFiles, what: str) -> list[SuiteExample]:
    image_dir = Path(split.image_dir)
    if spec.kind == "vqa":
        return [
            SuiteExample(e.id, (e.image,), e.question or "", e.references, e.target, e.answer_type)
            for e in load_vqa(split.questions, split.annotations, image_dir, what)
        ]
    if spec.kind == "multi":
        return _load_multi(split, image_dir, what)
    if spec.kind == "pope":
        out = []
        for i, r in enumerate(_jsonl(split.questions, what)):  # type: ignore[arg-type]
            _need(r, ("question_id", "image", "text", "label"), f"{split.questions}: line {i + 1}")
            label = str(r["label"]).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"{split.questions}: line {i + 1}: label must be yes or no")
            out.append(
                SuiteExample(
                    str(r["question_id"]),
                    (image_dir / r["image"],),
                    str(r["text"]),
                    (label,),
                    label,
                    r.get("category"),
                )
            )
        return out
    refs: dict[str, list[str]] = {}
    for i, r in enumerate(_jsonl(split.references, what)):  # type: ignore[arg-type]
        _need(r, ("question_id", "text"), f"{split.references}: line {i + 1}")
        refs.setdefault(str(r["question_id"]), []).append(str(r["text"]))
    out = []
    for i, r in enumerate(_jsonl(split.questions, what)):  # type: ignore[arg-type]
        _need(r, ("question_id", "image", "text"), f"{split.questions}: line {i + 1}")
        qid = str(r["question_id"])
        if qid not in refs:
            raise ValueError(f"task {what!r}: question {qid} has no reference answer")
        out.append(
            SuiteExample(
                qid,
                (image_dir / r["image"],),
                str(r["text"]),
                tuple(refs[qid]),
                refs[qid][0],
                r.get("category"),
            )
        )
    return out


def _load_multi(split: SplitFiles, image_dir: Path, what: str) -> list[SuiteExample]:
    qs = json.loads(Path(split.questions).read_text())  # type: ignore[arg-type]
    anns = json.loads(Path(split.annotations).read_text())  # type: ignore[arg-type]
    by_qid = {str(a["question_id"]): a for a in anns.get("annotations", [])}
    out = []
    for q in qs.get("questions", []):
        qid = str(q["question_id"])
        if qid not in by_qid:
            continue
        if not q.get("images"):
            raise ValueError(f"task {what!r}: question {qid} names no `images`")
        answers = tuple(str(a["answer"]) for a in by_qid[qid]["answers"])
        target = str(by_qid[qid].get("multiple_choice_answer") or answers[0])
        images = tuple(image_dir / name for name in q["images"])
        kind = by_qid[qid].get("answer_type")
        out.append(SuiteExample(qid, images, str(q["question"]), answers, target, kind))
    return out


def load_suite_task(spec: TaskSpec) -> SuiteTask:
    """A suite task from its spec (kinds `vqa` and those of `SUITE_KINDS`)."""
    if spec.kind not in ("vqa", *SUITE_KINDS):
        raise ValueError(f"task {spec.name!r}: kind {spec.kind!r} is not an SFT-suite kind")
    query = _load_split(spec, spec.query, spec.name)
    _check_images(spec.name, query)
    support: list[SuiteExample] = []
    if spec.support is not None:
        support = _load_split(spec, spec.support, f"{spec.name} (support)")
        _check_images(f"{spec.name} (support)", support)
    return SuiteTask(spec.name, spec.kind, query, support)


def load_suite(path: str | Path) -> list[SuiteTask]:
    """Every task of a suite file (a YAML list of `TaskSpec` dicts, paths relative to it).
    Mistakes in the file are one-line `ConfigError`s naming it and the task's position."""
    specs = read_task_specs(path, "suite file")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: task names must be distinct, got {names}")
    return [load_suite_task(s) for s in specs]
