"""The built-in synthetic world: a procedurally generated multimodal corpus with known facts.

A tiny MM1 can learn this world in minutes on a CPU. Every image is a *scene*: 1–4 coloured shapes
at named positions (plus, for "text-rich" images, a rendered word or number) on a plain or lightly
textured background. Because the facts of every scene are known, captions, interleaved documents,
VQA answers and evaluation references can all be generated — and grounded answers checked.

`write_world(out_dir, seed, size)` writes the world to disk in the formats users bring (REFERENCE
§3; one writer per format in `mm1.data.synthetic_writers`), so that it is read back through
the same readers as real data (`mm1.data.sources`):

    world.json                          manifest (counts, vocabulary, relative paths of everything)
    tokenizer.json                      byte-level BPE trained on the world's training text
    captions/00000.tar …                img2dataset WebDataset shards, noisy web "alt-text"
    captions_vecap/00000.tar …          the same layout, detailed re-captions (VeCap-style)
    interleaved/00000.parquet …         OBELICS-style parquet, image bytes embedded
    interleaved_mmc4/00000.jsonl …      MMC4-style jsonl + interleaved_mmc4/images/
    text/00000.jsonl …                  text-only documents (`text` field)
    sft/llava.json, sft/images/         LLaVA SFT conversations (+ sft/datasets.yaml, LLaVA-NeXT)
    sft/tasks/llava.json, .../images/   short-answer SFT questions in the SFT suite's forms
    sft/presence/llava.json, …          object-presence questions, each answer by its own coin
    eval/{val,support}/images/          held-out evaluation images (disjoint scenes)
    eval/{val,support}/captions.json    COCO-captions format, 5 references per image
    eval/{val,support}/vqa_questions.json, vqa_annotations.json   VQAv2 format, 10 answers

Evaluation scenes are disjoint from training scenes by construction: every scene's visible
content (objects, text, background) hashes to a split, and generators only keep scenes of the
split they write (`scene_split`). Files are byte-identical for the same seed and size.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mm1.data.scenes import (
    BACKGROUNDS,
    COLORS,
    MAX_NUMBER,
    POSITIONS,
    SHAPE_CORNERS,
    SHAPES,
    SIZE_NAMES,
    SIZES,
    SPECIAL_TOKENS,
    TEXTURES,
    WORDS,
    WORLD_FORMAT_VERSION,
)
from mm1.data.sft_tasks import write_sft_presence, write_sft_tasks
from mm1.data.synthetic_writers import (
    PRESETS,
    Tick,
    write_captions,
    write_eval,
    write_mmc4,
    write_obelics,
    write_sft,
    write_text,
)
from mm1.fs import LOCKS_UNSUPPORTED, DamagedFile, atomic_write_text, read_json, temp_files

# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def train_world_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Any:
    """Train a byte-level BPE tokenizer (HF `tokenizers`) on `texts`.

    Special tokens `<s>`, `</s>`, `<pad>`, `<image>`, `<|endofchunk|>` get ids 0–4. Any byte
    sequence can be encoded (the full byte alphabet is in the vocabulary). No normaliser and no
    post-processor: adding BOS/EOS is the tokenizer wrapper's job. Deterministic for the same input.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    cleaned = (t.replace("<image>", " ") for t in texts)
    tok.train_from_iterator(cleaned, trainer)
    return tok


# ----------------------------------------------------------------------------------------------
# Writing the world
# ----------------------------------------------------------------------------------------------


_OWNED = (
    "captions",
    "captions_vecap",
    "interleaved",
    "interleaved_mmc4",
    "text",
    "sft",
    "eval",
    "tokenizer.json",
    "world.json",
    "world.json.tmp",  # what earlier versions wrote world.json through
)
# Present while a world is written (removed once `world.json` is): a directory holding it is an
# interrupted world of ours, rewritten rather than refused.
WRITING_MARK = ".writing"


@dataclass
class WorldManifest:
    """What `write_world` wrote. Paths in `sources`/`eval` are relative to `root`."""

    root: Path
    seed: int
    size: str
    image_size: int
    sources: dict[str, dict[str, Any]]
    eval: dict[str, dict[str, Any]]
    vocabulary: dict[str, Any]
    tokenizer: str = "tokenizer.json"
    special_tokens: list[str] = field(default_factory=lambda: list(SPECIAL_TOKENS))
    format_version: int = WORLD_FORMAT_VERSION
    text_scale: float = 1.0

    def path(self, rel: str | Path) -> Path:
        return self.root / rel

    def shards(self, source: str) -> list[Path]:
        return [self.root / s for s in self.sources[source]["shards"]]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.tokenizer

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        return d

    @classmethod
    def load(cls, path: str | Path) -> WorldManifest:
        """Load from a world directory or its `world.json`."""
        p = Path(path)
        if p.is_dir():
            p = p / "world.json"
        data = read_json(p)
        try:
            return cls(root=p.parent, **data)
        except TypeError as err:  # not a mapping, or keys missing: not what `write_world` wrote
            raise DamagedFile(
                f"{p} is not a world manifest ({err}); `mm1 data synth --out {p.parent}` "
                "writes the world again"
            ) from None


def _refuse_foreign(root: Path) -> None:
    """Refuse a non-empty `root` that is neither a world (`world.json`) nor one whose writing
    was interrupted (`WRITING_MARK`): it holds something of the user's."""
    ours = (root / "world.json").exists() or (root / WRITING_MARK).exists()
    if root.exists() and any(root.iterdir()) and not ours:
        raise FileExistsError(
            f"{root} exists, is not empty and holds no world.json: refusing to write a "
            "synthetic world into it (choose an empty or new directory)"
        )


@contextlib.contextmanager
def _writing(root: Path) -> Iterator[bool]:
    """Hold the world's write lock: an exclusive `lockf` on `WRITING_MARK`, so a second process
    writing the same world waits for the first rather than deleting its files. The kernel drops
    the lock with the process, so an interrupted write leaves the mark but no lock. Yields
    whether it waited for another writer."""
    root.mkdir(parents=True, exist_ok=True)
    mark = root / WRITING_MARK
    waited = False
    while True:
        left_behind = mark.exists()
        fd = os.open(mark, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if left_behind:
                print(f"{root}: an earlier write was interrupted; writing again", file=sys.stderr)
        except OSError as err:
            if err.errno in LOCKS_UNSUPPORTED:  # no file locks here: write unguarded
                break
            print(f"waiting for another process writing the world at {root} ...", file=sys.stderr)
            fcntl.lockf(fd, fcntl.LOCK_EX)
            waited = True
        with contextlib.suppress(FileNotFoundError):
            if os.stat(mark).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)  # the writer waited for removed its mark when done: lock the path anew
    try:
        yield waited
    finally:
        os.close(fd)


def _clear(root: Path) -> None:
    for name in _OWNED:
        p = root / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for p in temp_files(root / "world.json"):  # left by a write killed midway
        p.unlink()


def _vocabulary() -> dict[str, Any]:
    return {
        "shapes": list(SHAPES),
        "shape_corners": dict(SHAPE_CORNERS),
        "colors": {k: list(v) for k, v in COLORS.items()},
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
        "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()},
        "textures": list(TEXTURES),
        "words": list(WORDS),
        "numbers": [0, MAX_NUMBER],
        "max_objects": 4,
    }


def write_world(
    out_dir: str | Path,
    seed: int = 0,
    size: str = "tiny",
    image_size: int = 64,
    vocab_size: int = 1024,
    text_scale: float = 1.0,
    progress: bool = False,
    keep_existing: bool = False,
) -> WorldManifest:
    """Write the synthetic world of `size` ("tiny", "small" or "medium") to `out_dir`.

    `text_scale` sets how much text surrounds the images: 1.0 (default) gives web-like
    interleaved pages and long text documents (about one text token per image token at 144
    image tokens, enough to fill 4096-token sequences under a 16-image cap); 0 gives compact
    documents (more images per token: faster visual learning in a CPU demo).

    Deterministic: the same arguments give byte-identical files. `progress` shows a bar.
    `out_dir` must be new, empty, a previous world (whose files are replaced, or kept with
    `keep_existing`) or one whose writing was interrupted. `world.json` is written last, so its
    presence means the world is complete; one process writes a world at a time, and one that
    waited for another keeps the world it wrote if it was asked for the same settings.
    """
    if size not in PRESETS:
        raise ValueError(f"unknown world size {size!r}: expected one of {', '.join(SIZE_NAMES)}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    if text_scale < 0:
        raise ValueError(f"text_scale must be >= 0, got {text_scale}")
    root = Path(out_dir)
    _refuse_foreign(root)
    with _writing(root) as waited:
        done = (root / "world.json").exists()
        if done and (keep_existing or waited):  # written while this one waited, or kept
            m = WorldManifest.load(root)
            asked = (seed, size, image_size, text_scale, vocab_size)
            if keep_existing or _settings(m) == asked:  # deterministic: the same files
                return m
        _clear(root)
        manifest = _write_files(root, seed, size, image_size, vocab_size, text_scale, progress)
        (root / WRITING_MARK).unlink()
    return manifest


def _settings(m: WorldManifest) -> tuple[int, str, int, float, int]:
    """The arguments of `write_world` a world was written with (they fix its every byte)."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(m.tokenizer_path)).get_vocab_size()
    return m.seed, m.size, m.image_size, m.text_scale, vocab


def _write_files(
    root: Path,
    seed: int,
    size: str,
    image_size: int,
    vocab_size: int,
    text_scale: float,
    progress: bool,
) -> WorldManifest:
    """Every file of the world into the empty `root`, `world.json` last."""
    preset = PRESETS[size]
    texts: list[str] = []
    # Each stage takes a `tick(fraction)` callback, so the bar moves within a stage too.
    stages: dict[str, Callable[[Tick], dict[str, Any]]] = {
        "captions": lambda tick: write_captions(
            root, "captions", "alt", seed, preset, image_size, texts, tick
        ),
        "captions_vecap": lambda tick: write_captions(
            root, "captions_vecap", "recap", seed, preset, image_size, texts, tick
        ),
        "interleaved": lambda tick: write_obelics(
            root, seed, preset, image_size, texts, text_scale, tick
        ),
        "interleaved_mmc4": lambda tick: write_mmc4(
            root, seed, preset, image_size, texts, text_scale, tick
        ),
        "text": lambda tick: write_text(root, seed, preset, texts, text_scale, tick),
        "sft": lambda tick: write_sft(root, seed, preset, image_size, texts, tick),
        # not given `texts`: the tokenizer, like every file of worlds before it, is unchanged
        "sft_tasks": lambda tick: write_sft_tasks(root, seed, size, image_size),
        "sft_presence": lambda tick: write_sft_presence(root, seed, size, image_size),
        "eval/val": lambda tick: write_eval(
            root, "val", preset.val_images, seed, preset, image_size, tick
        ),
        "eval/support": lambda tick: write_eval(
            root, "support", preset.support_images, seed, preset, image_size, tick
        ),
    }
    written: dict[str, dict[str, Any]] = {}
    console = Console(stderr=True)
    # A live bar only draws on a terminal; elsewhere (a job log, a pipe) say each stage in a line.
    lines = progress and not console.is_terminal
    start = time.perf_counter()

    def stage(i: int, name: str) -> None:
        if lines:
            elapsed = time.perf_counter() - start
            msg = f"synthetic world: {name} ({i}/{len(stages) + 1}, {elapsed:.0f}s)"
            print(msg, file=sys.stderr, flush=True)

    with Progress(
        TextColumn("[bold]synthetic world"),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        disable=not progress or lines,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=len(stages) + 1)
        for i, (name, write) in enumerate(stages.items(), 1):
            bar.update(task, description=name, completed=i - 1)
            stage(i, name)
            written[name] = write(lambda f, i=i: bar.update(task, completed=i - 1 + f))
        bar.update(task, description="tokenizer", completed=len(stages))
        stage(len(stages) + 1, "tokenizer")
        tok = train_world_tokenizer(texts, vocab_size)
        tok.save(str(root / "tokenizer.json"))
        bar.advance(task)
    sources = {k: v for k, v in written.items() if not k.startswith("eval/")}
    evals = {k.split("/")[1]: v for k, v in written.items() if k.startswith("eval/")}
    manifest = WorldManifest(
        root=root,
        seed=seed,
        size=size,
        image_size=image_size,
        text_scale=text_scale,
        sources=sources,
        eval=evals,
        vocabulary=_vocabulary(),
    )
    # Atomically: an interrupted write must not leave a world.json that claims a whole world.
    atomic_write_text(
        root / "world.json", json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    )
    return manifest
