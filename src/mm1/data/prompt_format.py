"""How images and turns become tokens: one object, saved with the model, so that prompts at
evaluation and generation are written the way the model was trained.

`PromptFormat` holds
- `image_tokens` (Q): the slots one encoder input (one crop) fills (`model.connector.num_tokens`);
- `crops(image)` / `slots(image)`: how many encoder inputs an image becomes and how many slots it
  takes, from its size alone (`crops_for_size` / `slots_for_size`); `crop(image, processor)`
  makes those inputs and `pixel_values` runs the image processor on them, checking the count;
  `image_info` gives the per-image crop counts and sizes the model needs beside the pixels.
  Here (`single`) every image is one crop, itself, Q slots; the tiled layouts (`mm1`,
  `anyres`, `dynamic`, `mm1.data.layouts`) override `crops_for_size` (and `slots_for_size`)
  and `crop` together, so slots written and pixel rows given agree. `high_res=False` writes
  an image in the single form whatever the layout (few-shot context images);
- `image_boundaries`: each image's slots between `<img>` and `</img>` (`data.image_boundaries`);
- `chat_template`: None for the tokenizer's own template (`plain` when it has none), else a
  built-in name, one of the tokenizer's named templates, or a jinja source. The template text
  itself stays where transformers keeps it, in the tokenizer directory's tokenizer_config.json
  (`data.chat_template` is set on the tokenizer and saved there), so the format refers to it.

`prompt_format.json` sits next to the tokenizer (an exported directory, a run's tokenizer/):
{"version": 2, "image_layout": "single", "image_tokens": Q, "image_boundaries": bool,
"chat_template": null}, plus a tiled layout's own keys (`crop_size`, `pinpoints`, `grid`,
`min_tiles`, `max_tiles`, `overview`). Older directories still load: version 1 held only {"image_boundaries"};
before that a run directory's config.yaml says `data.image_boundaries`; Q then comes from the
model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mm1.fs import DamagedFile, read_json

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from mm1.config import DataConfig, ModelConfig
    from mm1.data.images import ImageProcessor

PROMPT_FORMAT = "prompt_format.json"
FORMAT_VERSION = 2


@dataclass(frozen=True)
class PromptFormat:
    """Image slots, image boundaries and the chat template of one model (see the module)."""

    image_tokens: int
    image_boundaries: bool = False
    chat_template: str | None = None

    # Saved as `image_layout`; a subclass that crops differently registers its own name.
    layout: ClassVar[str] = "single"

    def __post_init__(self) -> None:
        if isinstance(self.image_tokens, bool) or not isinstance(self.image_tokens, int):
            raise ValueError(f"image_tokens must be an int, got {self.image_tokens!r}")
        if self.image_tokens < 1:
            raise ValueError(f"image_tokens must be positive, got {self.image_tokens}")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise ValueError(f"chat_template must be a string or None, got {self.chat_template!r}")

    @classmethod
    def from_config(
        cls, data: DataConfig, image_tokens: int, model: ModelConfig | None = None
    ) -> PromptFormat:
        """The format a run trains with: the model's Q and image layout (`model.image_layout`,
        `single` without a model) and `data.image_boundaries`; the chat template is the
        tokenizer's (`data.chat_template` is set on the tokenizer)."""
        base = cls(image_tokens, image_boundaries=bool(data.image_boundaries))
        if model is None or model.image_layout.type == PromptFormat.layout:
            return base
        _register_builtin_layouts()
        layout = LAYOUTS[model.image_layout.type]
        return layout.from_model(base, model)  # type: ignore[attr-defined]

    # -- images ----------------------------------------------------------------------------------

    def crops_for_size(self, size: tuple[int, int]) -> int:
        """Encoder inputs an image of `size` (width, height) becomes: one, the whole image."""
        return 1

    def slots_for_size(self, size: tuple[int, int]) -> int:
        """Image slots an image of `size` (width, height) takes (boundary tokens not counted)."""
        return self.crops_for_size(size) * self.image_tokens

    def crops(self, image: Image.Image, high_res: bool = True) -> int:
        """Encoder inputs `image` becomes (rows of `pixel_values`); `high_res=False`: one, the
        `single` form (see `mm1.data.layouts`)."""
        return self.crops_for_size(image.size) if high_res else 1

    def slots(self, image: Image.Image, high_res: bool = True) -> int:
        """Image slots `image` takes in a token sequence (boundary tokens not counted)."""
        return self.slots_for_size(image.size) if high_res else self.image_tokens

    def crop(
        self, image: Image.Image, processor: ImageProcessor | None = None, high_res: bool = True
    ) -> list[Image.Image]:
        """The `crops(image)` images the processor turns into pixel rows: the image itself."""
        return [image]

    def pixel_values(
        self,
        processor: ImageProcessor,
        images: list[Image.Image],
        high_res: Sequence[bool] | None = None,
    ) -> torch.Tensor:
        """(sum of crops, 3, H, W): each image's crops in order, as its slots are written;
        `high_res[i]` False writes image i in the `single` form."""
        flags = _flags(images, high_res)
        pieces = [p for im, hi in zip(images, flags) for p in self.crop(im, processor, hi)]
        pixels = processor(pieces)
        expected = sum(self.crops(image, hi) for image, hi in zip(images, flags))
        if pixels.shape[0] != expected:
            raise ValueError(
                f"the image processor gave {pixels.shape[0]} crops for {len(images)} images; "
                f"the prompt format ({self.layout}) writes slots for {expected}"
            )
        return pixels

    def image_info(
        self, images: list[Image.Image], high_res: Sequence[bool] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: its crop count (N,) and its original (height, width) (N, 2), long: what
        the model needs beside the pixels to assemble a tiled image's tokens (`Batch`)."""
        import torch

        flags = _flags(images, high_res)
        crops = torch.tensor(
            [self.crops(im, hi) for im, hi in zip(images, flags)], dtype=torch.long
        )
        sizes = torch.tensor([(im.height, im.width) for im in images], dtype=torch.long)
        return crops, sizes.reshape(-1, 2)

    # -- turns -----------------------------------------------------------------------------------

    def template_choice(self, tokenizer_template: Any) -> str | None:
        """The `chat_template` argument for `select_template` given the tokenizer's own
        template(s): ours, else the tokenizer's, else `plain`."""
        if self.chat_template is None and tokenizer_template is None:
            return "plain"
        return self.chat_template

    # -- files -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "image_layout": self.layout, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = PROMPT_FORMAT) -> PromptFormat:
        layout = data.get("image_layout", PromptFormat.layout)
        _register_builtin_layouts()
        if layout not in LAYOUTS:
            raise ValueError(
                f"{where}: unknown image_layout {layout!r}; known: {', '.join(sorted(LAYOUTS))}"
            )
        if int(data.get("version", 1)) > FORMAT_VERSION:
            raise ValueError(f"{where}: version {data['version']} is newer than this mm1 reads")
        cls_ = LAYOUTS[layout]
        names = {f.name for f in fields(cls_) if f.init}
        unknown = set(data) - {"version", "image_layout", *names}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["image_boundaries"] = bool(data.get("image_boundaries", False))
        kwargs.setdefault("chat_template", None)
        try:
            return cls_(**kwargs)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PROMPT_FORMAT
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


# Prompt-format classes by `image_layout` name (what `load_prompt_format` can read back).
LAYOUTS: dict[str, type[PromptFormat]] = {PromptFormat.layout: PromptFormat}


def _register_builtin_layouts() -> None:
    import mm1.data.layouts  # noqa: F401  (registers mm1, anyres, dynamic on import)


def _flags(images: list[Image.Image], high_res: Sequence[bool] | None) -> list[bool]:
    if high_res is None:
        return [True] * len(images)
    if len(high_res) != len(images):
        raise ValueError(f"high_res has {len(high_res)} flags for {len(images)} images")
    return [bool(h) for h in high_res]


def register_layout(cls: type[PromptFormat]) -> type[PromptFormat]:
    """Make a PromptFormat subclass loadable under its `layout` name."""
    LAYOUTS[cls.layout] = cls
    return cls


def load_prompt_format(directory: str | Path, image_tokens: int) -> PromptFormat:
    """The prompt format saved in a model directory (an export, a run's tokenizer/).

    `image_tokens` is the model's Q: it fills in for directories written before the format
    recorded it, and a saved value that disagrees with it is an error. Directories without
    prompt_format.json: a run's config.yaml gives `data.image_boundaries`, an export has none.
    """
    directory = Path(directory)
    path = directory / PROMPT_FORMAT
    if path.is_file():
        data = read_json(path)
        if not isinstance(data, dict):
            raise DamagedFile(f"{path}: not a JSON object")
        saved = data.setdefault("image_tokens", image_tokens)  # version 1: image_boundaries only
        if saved != image_tokens:
            raise ValueError(
                f"{path}: image_tokens {saved} but the model fills {image_tokens} slots per image"
            )
        return PromptFormat.from_dict(data, str(path))
    return PromptFormat(image_tokens, image_boundaries=saved_image_boundaries(directory))


def saved_image_boundaries(directory: str | Path) -> bool:
    """Whether a model directory's images were written between `<img>` and `</img>`, whatever
    its number of image tokens (a later stage may change that): prompt_format.json, else a
    run's config.yaml, else False (an export written before the format existed)."""
    directory = Path(directory)
    path = directory / PROMPT_FORMAT
    if path.is_file():
        data = read_json(path)
        return bool(isinstance(data, dict) and data.get("image_boundaries", False))
    config = directory.parent / "config.yaml"  # <run>/tokenizer -> <run>/config.yaml
    if directory.name == "tokenizer" and config.is_file():
        import yaml

        data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
        return bool(data.get("image_boundaries", False))
    return False
