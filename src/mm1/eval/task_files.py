"""Reading the files of a few-shot task (REFERENCE §3): COCO-captions JSON and VQAv2 questions and
annotations JSON, each with an image folder, into `Example`s. A file of the wrong kind is a
`WrongFileError` naming its role; missing images are an error that counts and names them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class WrongFileError(ValueError):
    """A task's file that is not of the kind its key says (`captions:` naming a VQA questions
    file); `key` is that key, for the task loader to name the spec's key (`query.captions`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Example:
    """One query or demonstration.

    `id` is the scoring key (the image id for captions, the question id for VQA), as a string.
    `references` are the reference captions, or the (usually 10) VQA answers. `target` is the text a
    demonstration shows as its answer: the first reference caption or the first VQA answer, as
    OpenFlamingo's demonstrations do.
    """

    id: str
    image_id: str
    image: Path
    references: tuple[str, ...]
    target: str
    question: str | None = None
    answer_type: str | None = None  # VQA's "yes/no" / "number" / "other", where annotated


def _read_json(path: str | Path, what: str, key: str) -> Any:
    """The JSON of a task's file; `key` names the file's role (`captions`) in errors."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: {p} does not exist")
    try:
        return json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WrongFileError(key, f"{p}: not a JSON file ({err})") from None


def _check_records(
    data: Any, path: str | Path, key: str, kind: str, needs: dict[str, tuple[str, ...]]
) -> None:
    """`data` holds, under each of `needs`' keys, a list of records with the fields listed: else
    a `WrongFileError` naming the first record that lacks one (a COCO captions file given as a
    VQA annotations file has `annotations` records without `question_id`)."""
    wanted = " and ".join(f"`{k}`" for k in needs)
    if not isinstance(data, dict) or any(k not in data for k in needs):
        raise WrongFileError(key, f"{path}: not a {kind} file (needs {wanted})")
    for list_key, fields in needs.items():
        records = data[list_key]
        if not isinstance(records, list):
            raise WrongFileError(key, f"{path}: not a {kind} file (`{list_key}` is not a list)")
        for i, record in enumerate(records):
            lacking = [f for f in fields if not isinstance(record, dict) or f not in record]
            if lacking:
                raise WrongFileError(
                    key,
                    f"{path}: not a {kind} file ({list_key}[{i}] has no "
                    + ", ".join(f"`{f}`" for f in lacking)
                    + ")",
                )


def _missing_error(
    task: str, image_dir: Path, missing: list[str], total: int, affected: str = ""
) -> FileNotFoundError:
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    return FileNotFoundError(
        f"task {task!r}: {len(missing)} of {total} images are missing under {image_dir}"
        f"{affected}: {shown}. Fix the image folder (or the annotations) rather than scoring a "
        "subset."
    )


def load_coco_captions(
    captions: str | Path | None, image_dir: str | Path, task: str
) -> list[Example]:
    """One example per image of a COCO captions file, references = all its captions (in file
    order), in the order of the file's `images` list."""
    if captions is None:
        raise ValueError(f"task {task!r}: no captions file")
    data = _read_json(captions, f"task {task!r}", "captions")
    _check_records(
        data,
        captions,
        "captions",
        "COCO captions",
        {"images": ("id", "file_name"), "annotations": ("image_id", "caption")},
    )
    refs: dict[str, list[str]] = {}
    for ann in data["annotations"]:
        refs.setdefault(str(ann["image_id"]), []).append(str(ann["caption"]))
    image_dir = Path(image_dir)
    examples, missing = [], []
    for img in data["images"]:
        image_id = str(img["id"])
        if image_id not in refs:
            continue  # an image without captions is not part of the caption benchmark
        path = image_dir / img["file_name"]
        if not path.is_file():
            missing.append(img["file_name"])
        examples.append(Example(image_id, image_id, path, tuple(refs[image_id]), refs[image_id][0]))
    if missing:
        raise _missing_error(task, image_dir, missing, len(examples))
    if not examples:
        raise ValueError(f"task {task!r}: {captions} has no captioned images")
    return examples


def _index_image_dir(image_dir: Path) -> dict[str, Path]:
    """{image id (digits at the end of the file name, leading zeros dropped): path}."""
    index: dict[str, Path] = {}
    clashes: dict[str, list[str]] = {}
    if not image_dir.is_dir():
        return index
    for p in sorted(image_dir.iterdir()):
        if p.suffix.lower() not in _IMAGE_SUFFIXES:
            continue
        m = re.search(r"(\d+)$", p.stem)
        if not m:
            continue
        key = str(int(m.group(1)))
        if key in index:
            clashes.setdefault(key, [index[key].name]).append(p.name)
        index[key] = p
    if clashes:
        key, names = next(iter(clashes.items()))
        raise ValueError(
            f"{image_dir}: {len(clashes)} image ids match several files (e.g. id {key}: {names}); "
            "set the task's image_pattern"
        )
    return index


def load_vqa(
    questions: str | Path | None,
    annotations: str | Path | None,
    image_dir: str | Path,
    task: str,
    image_pattern: str | None = None,
) -> list[Example]:
    """One example per question that has an annotation, in the questions file's order."""
    if questions is None or annotations is None:
        raise ValueError(f"task {task!r}: VQA needs a questions and an annotations file")
    qs = _read_json(questions, f"task {task!r}", "questions")
    anns = _read_json(annotations, f"task {task!r}", "annotations")
    _check_records(
        qs,
        questions,
        "questions",
        "VQAv2 questions",
        {"questions": ("question_id", "image_id", "question")},
    )
    _check_records(
        anns,
        annotations,
        "annotations",
        "VQAv2 annotations",
        {"annotations": ("question_id", "answers")},
    )
    by_qid = {str(a["question_id"]): a for a in anns["annotations"]}
    image_dir = Path(image_dir)
    index: dict[str, Path] | None = None
    examples, missing = [], []
    unannotated = 0
    for q in qs["questions"]:
        qid = str(q["question_id"])
        ann = by_qid.get(qid)
        if ann is None:
            unannotated += 1
            continue
        image_id = str(q["image_id"])
        name = q.get("file_name") or q.get("image") or q.get("image_path")
        if name is not None:
            path = image_dir / name
        elif image_pattern is not None:
            raw = q["image_id"]
            path = image_dir / image_pattern.format(
                image_id=int(raw) if str(raw).isdigit() else raw
            )
        else:
            if index is None:
                index = _index_image_dir(image_dir)
            key = str(int(image_id)) if image_id.isdigit() else image_id
            path = index.get(key, image_dir / f"<image id {image_id}>")
        if not path.is_file():
            missing.append(path.name)
        answers = [str(a["answer"]) for a in ann["answers"]]
        if not answers:
            raise ValueError(f"task {task!r}: question {qid} has no answers")
        target = answers[0]  # the answer a demonstration shows: OpenFlamingo's answers[0]
        examples.append(
            Example(
                qid,
                image_id,
                path,
                tuple(answers),
                str(target),
                question=str(q["question"]),
                answer_type=ann.get("answer_type"),
            )
        )
    if missing:
        images = {e.image for e in examples}
        affected = f" ({len(missing)} of {len(examples)} questions)"
        raise _missing_error(task, image_dir, sorted(set(missing)), len(images), affected)
    if not examples:
        raise ValueError(
            f"task {task!r}: no question of {questions} has an annotation in {annotations}"
            + (f" ({unannotated} unannotated)" if unannotated else "")
        )
    return examples
