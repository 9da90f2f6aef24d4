"""What a run reads: the synthetic world by default, or the sources the config names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mm1.config import ConfigError, DataConfig, InitConfig, ModelConfig, SourceConfig
from mm1.data.catalog import check_sources
from mm1.data.chat_template import (
    BUILTIN_TEMPLATES,
    BUILTIN_TOKENS,
    check_template,
    template_from_option,
)
from mm1.data.images import PREPROCESSOR_CONFIG, ImageProcessor
from mm1.data.prompt_format import saved_image_boundaries
from mm1.data.synthetic import WorldManifest, write_world
from mm1.data.tokenizer import Tokenizer

# The paper's mixture over the world's training sources: 45% interleaved documents (OBELICS
# parquet and MMC4 jsonl), 45% caption pairs (alt-text, and VeCap-style re-captions as a minority
# like the paper's 300M synthetic of 2.3B), 10% text.
WORLD_MIXTURE = (
    ("interleaved", 0.30),
    ("interleaved_mmc4", 0.15),
    ("captions", 0.30),
    ("captions_vecap", 0.15),
    ("text", 0.10),
)


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    processor: ImageProcessor
    sources: list[SourceConfig]
    val_sources: list[SourceConfig]
    world: WorldManifest | None = None


def ensure_world(
    data: DataConfig, is_main: bool = True, barrier: Callable[[], None] = lambda: None
) -> WorldManifest:
    """The synthetic world at `data.world`, written first (by rank 0) when absent."""
    root = Path(data.world)
    if is_main and not (root / "world.json").exists():
        print(f"writing the synthetic world ({data.world_size}) to {root} ...", flush=True)
        write_world(
            root,
            seed=data.world_seed,
            size=data.world_size,
            text_scale=data.world_text_scale,
            image_size=data.world_image_size,
            progress=True,
            keep_existing=True,  # another run may have written it meanwhile
        )
    barrier()
    world = WorldManifest.load(root)
    if world.image_size != data.world_image_size:
        raise ConfigError(
            f"data.world_image_size={data.world_image_size}, but the world at {root} was drawn "
            f"at {world.image_size} px: set it to {world.image_size} or choose another data.world"
        )
    return world


def world_sources(world: WorldManifest) -> tuple[list[SourceConfig], list[SourceConfig]]:
    """Training sources with the MM1 mixture, and the held-out caption split for validation;
    each named after its part of the world (`WORLD_MIXTURE`), so per-dataset losses keep their
    keys across runs."""
    train = []
    for name, weight in WORLD_MIXTURE:
        src = world.sources[name]
        folder = world.root / Path(src["shards"][0]).parent
        image_dir = src.get("image_dir") or src.get("image_folder")
        train.append(
            SourceConfig(
                format=src["format"],
                path=str(folder),
                weight=weight,
                name=name,
                kind=src["kind"],
                image_root=str(world.root / image_dir) if image_dir else None,
            )
        )
    val = world.eval["val"]
    val_sources = [
        SourceConfig(
            format="coco",
            path=str(world.root / val["coco_captions"]),
            name="val",
            kind="captions",
            image_root=str(world.root / val["image_dir"]),
        )
    ]
    return train, val_sources


def saved_tokenizer_dir(path: str | Path) -> Path:
    """Where the tokenizer and image preprocessing of a starting point are: a run's
    `tokenizer/` (also for one of its `checkpoints/step_N`), else the directory itself (an
    export, an HF checkpoint)."""
    p = Path(path)
    if (p / "tokenizer").is_dir():
        return p / "tokenizer"
    if (p / "meta.json").is_file() and (p.parent.parent / "tokenizer").is_dir():
        return p.parent.parent / "tokenizer"
    return p


def carried_image_boundaries(
    data: DataConfig, init: InitConfig, run_dir: str | Path, resuming: bool
) -> bool:
    """`data.image_boundaries`, resolved: the value set, else the prompt format the model was
    trained with, so a stage (SFT after pre-training) writes images as its starting point did.
    That is the run's own when `resuming`, else that of the decoder's starting point
    (`train.init.decoder`, else `train.init.weights`; an HF checkpoint has none: False)."""
    if data.image_boundaries is not None:
        return bool(data.image_boundaries)
    if resuming:
        return saved_image_boundaries(Path(run_dir) / "tokenizer")
    start = init.decoder or init.weights
    return saved_image_boundaries(saved_tokenizer_dir(start)) if start else False


def image_processor_for(
    model: ModelConfig, init: InitConfig | None = None, saved: Path | None = None
) -> ImageProcessor:
    """The preprocessing saved in `saved` (a resumed run's own), else that of the encoder's
    starting point (`train.init.vision`, else `train.init.weights`), at our image size, or
    the variant's defaults."""
    size = model.vision.image_size
    init_dir = (init.vision or init.weights) if init is not None else model.vision.init
    src = saved or (saved_tokenizer_dir(init_dir) if init_dir else None)
    if src is not None and (src / PREPROCESSOR_CONFIG).exists():
        base = ImageProcessor.from_pretrained(src)
        if base.shortest_edge is not None:
            return ImageProcessor.from_pretrained(src, shortest_edge=size, crop_size=(size, size))
        return ImageProcessor.from_pretrained(src, size=(size, size))
    if model.vision.variant == "siglip":
        return ImageProcessor.siglip(size)
    return ImageProcessor.clip(size)


def prepare_data(
    data: DataConfig,
    model: ModelConfig,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    init: InitConfig | None = None,
    resumed: str | Path | None = None,
) -> PreparedData:
    """Tokenizer, image processor and sources of a run; every source is checked to name data
    (`check_sources`), so a wrong path fails here, before a model is built. The tokenizer is
    `data.tokenizer`, else the decoder's starting point's (`train.init.decoder`, else
    `train.init.weights`), else the synthetic world's. A `resumed` run directory's own
    (`RUN/tokenizer`, saved when it started) comes first: its ids and template are the ones it
    trained with, whatever became of its starting point since (edited, updated or deleted)."""
    world = None
    sources, val_sources = list(data.sources), list(data.val_sources)
    if init is None:
        init = InitConfig(vision=model.vision.init, decoder=model.decoder.init)
    own = Path(resumed) / "tokenizer" if resumed is not None else None
    if own is not None and not (own / "tokenizer.json").is_file():
        own = None  # saved before its first checkpoint: always there for a resumable run
    configured = configured_tokenizer(data, init) if own is None else None
    needs_world = not sources or (own is None and configured is None)
    if needs_world:
        world = ensure_world(data, is_main, barrier)
        default_train, default_val = world_sources(world)
        sources = sources or default_train
        if not data.sources and not val_sources:
            val_sources = default_val
    check_sources(sources)
    check_sources(val_sources, "data.val_sources")
    if own is not None:
        tokenizer = Tokenizer.from_file(own)
    elif configured is not None:
        tokenizer = read_tokenizer(*configured)
    else:
        assert world is not None
        tokenizer = Tokenizer.from_file(world.tokenizer_path)
    if data.chat_template:
        _set_chat_template(tokenizer, data.chat_template)
    elif tokenizer.chat_template is None and any(s.resolved_kind == "sft" for s in sources):
        # Conversations are then written with the built-in plain template: the run's tokenizer
        # saves it, so chat, serve and HF exports write turns as the model learned them.
        tokenizer.chat_template = BUILTIN_TEMPLATES["plain"]
    return PreparedData(
        tokenizer=tokenizer,
        processor=image_processor_for(model, init, own),
        sources=sources,
        val_sources=val_sources,
        world=world,
    )


def configured_tokenizer(data: DataConfig, init: InitConfig) -> tuple[Path, str] | None:
    """Where the configured tokenizer is, and the option that names it: `data.tokenizer`, else
    the decoder's starting point's (`train.init.decoder`, else `train.init.weights`); None for
    the synthetic world's."""
    if data.tokenizer:
        return Path(data.tokenizer), f"data.tokenizer={data.tokenizer}"
    start = init.decoder or init.weights
    if start:
        from mm1.models.starting_point import source_kind

        which = "train.init.decoder" if init.decoder else "train.init.weights"
        if Path(start).exists():  # one that holds no model says so, not "no tokenizer"
            source_kind(start, which)
        return saved_tokenizer_dir(start), f"{which}={start}"
    return None


def read_tokenizer(path: Path, option: str) -> Tokenizer:
    """The tokenizer at `path`, which `option` names; a missing one is a config error naming
    it (e.g. an SFT config whose pre-trained run has not been trained yet)."""
    try:
        return Tokenizer.from_file(path)
    except FileNotFoundError:
        start = not option.startswith("data.")  # a starting point's: a run, an HF directory
        if not path.exists():
            why = "does not exist" + (" (not trained yet?)" if start else "")
        else:
            why = "has no tokenizer.json" + (" (give one with data.tokenizer)" if start else "")
        raise ConfigError(f"{option}: {why}") from None


def _set_chat_template(tok: Tokenizer, value: str) -> None:
    """`data.chat_template` replaces the tokenizer's own; the run's tokenizer directory saves it."""
    try:
        name, source = template_from_option(value)
    except ValueError as err:
        raise ConfigError(f"data.chat_template: {err}") from None
    missing = [t for t in BUILTIN_TOKENS.get(name, ()) if tok.token_to_id(t) is None]
    if missing:
        raise ConfigError(
            f"data.chat_template={value!r} needs the special tokens {missing}, which the "
            "tokenizer does not have"
        )
    # Tried now: a template that cannot render (or never writes the answer) would otherwise
    # skip every record as untokenizable, and the run would blame the data.
    try:
        check_template(source, tok.template_variables, (tok.end_of_turn_tokens(), tok.eos_token))
    except ValueError as err:
        raise ConfigError(f"data.chat_template={value}: {err}") from None
    tok.chat_template = source


def run_world(model_dir: str | Path) -> str:
    """The synthetic world a run trained on (`data.world` in its saved config.yaml), else the
    default location (an export has no config). For one of a run's `checkpoints/step_N` it is
    the run's: the checkpoint has no config.yaml of its own, and falling back to the default
    would silently score on whatever world the current directory holds."""
    import yaml

    from mm1.checkpoint import is_checkpoint

    p = Path(model_dir)
    saved = (p.parent.parent if is_checkpoint(p) else p) / "config.yaml"
    if saved.is_file():
        world = ((yaml.safe_load(saved.read_text()) or {}).get("data") or {}).get("world")
        if world:
            return str(world)
    return "data/world"
