"""A SEED-style model (`model.family: seed`; Ge et al., "Making LLaMA SEE and Draw with SEED
Tokenizer", ICLR 2024): Chameleon's early fusion over SEED's tokens. Each image is
`model.seed.num_queries` discrete codes of a SEED tokenizer (`mm1.models.seed_tokenizer`: a
causal Q-Former over a frozen CLIP ViT; trained beforehand by `mm1 train-encoder` with
`encoder.objective: seed`, read with `train.init.vision`, frozen here), in their 1D causal order;
the codes are more tokens of the decoder's vocabulary, after the text's, and the decoder predicts
them with the cross-entropy `image_codes` beside the text's, exactly as `mm1.models.chameleon`
describes. A generated image comes out as its codes' generation embedding (the tokenizer's
de-tokenizer), in the CLIP run's image-embedding space: SEED draws pixels from it with a
diffusion model, which mm1 does not have.
"""

from __future__ import annotations

from mm1.config import IMAGE_CODES, ConfigError, ModelConfig
from mm1.config.encoder import validate_seed
from mm1.models.chameleon import Chameleon
from mm1.models.family import MM1_FAMILY, ModelFamily, decoder_blocks, mm1_hf
from mm1.models.seed_tokenizer import SEEDTokenizer
from mm1.registry import FAMILIES


class SEED(Chameleon):
    """A frozen SEED tokenizer (`vision`) and a decoder whose vocabulary holds its codes."""

    def build_tokenizer(self) -> SEEDTokenizer:
        return SEEDTokenizer(self.cfg.vision, self.cfg.seed)


def _validate(cfg: ModelConfig, prefix: str) -> None:
    validate_seed(cfg.seed, prefix)
    if cfg.image_layout.type != "single":
        raise ConfigError(
            f"{prefix}.image_layout.type={cfg.image_layout.type}: model.family=seed reads each "
            "image as one sequence of codes (single), as SEED does"
        )


def _describe(cfg: ModelConfig) -> str:
    s = cfg.seed
    return (
        f"a frozen {cfg.vision.variant} ViT ({cfg.vision.layers} blocks) -> a causal Q-Former "
        f"({s.layers} blocks) -> {s.num_queries} codes of {s.codebook_size}, each a token of the "
        "vocabulary"
    )


SEED_FAMILY = FAMILIES.register("seed")(
    ModelFamily(
        "seed",
        SEED,
        mm1_hf,
        decoder_blocks,
        MM1_FAMILY.init_buffers,  # the decoder's RoPE buffers
        num_image_tokens=lambda cfg: cfg.seed.num_queries,
        validate=_validate,
        describe=_describe,
        image_loss=IMAGE_CODES,
        image_tokenizer="seed",
        codebook_size=lambda cfg: cfg.seed.codebook_size,
    )
)
