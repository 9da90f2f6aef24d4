"""A VQ image tokenizer (van den Oord et al., VQ-VAE; the tokenizer family of VQ-GAN, which
Chameleon uses): a convolutional encoder downsamples the image 2^S times, each cell's vector is
replaced by the nearest of K codes (its token), and a decoder mirrors the encoder from the codes
back to pixels.

Codes and encoder outputs are compared l2-normalised (cosine distance; ViT-VQGAN's choice).
Training (`VQModel`, `mm1 train-encoder` with `encoder.objective: vq`) minimises the
reconstruction's mean squared error plus the commitment loss beta ||z - sg(e)||^2, the gradient
passing the quantiser straight through. The codebook is not learned by gradient but as each
code's moving average of the encoder outputs assigned to it (VQ-VAE-2's EMA update, summed over
ranks), and a code no output has come near for a while restarts at a random output of the batch
(the dead-code restart of Jukebox / SoundStream): on the synthetic world a gradient-learned
codebook collapsed to a handful of codes within 20 steps (3 to 10 of 1,024 in use). VQ-GAN's
perceptual and adversarial losses are not used.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm1.config import VQConfig
from mm1.config.encoder import VQObjectiveConfig
from mm1.models.clip import EncoderOutput

CODEBOOK_BUFFERS = ("codes", "code_sum", "code_count")


def full_precision(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Autocast off on `device` (nothing to turn off on the meta device)."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(_groups(channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class EMACodebook(nn.Module):
    """K l2-normalised codes of width d, learned as each code's moving average of the vectors
    assigned to it (not by gradient), in three fp32 buffers saved with the weights: the image
    tokenizers' quantiser (VQ's, SEED's)."""

    def __init__(self, codebook_size: int, code_dim: int) -> None:
        super().__init__()
        # Buffers: updated in the training forward, saved with the weights, never touched by
        # the optimiser.
        k, d = codebook_size, code_dim
        self.register_buffer("codes", torch.empty(k, d))
        self.register_buffer("code_sum", torch.empty(k, d))  # EMA of the assigned outputs' sum
        self.register_buffer("code_count", torch.empty(k))  # EMA of the assigned outputs' count

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> EMACodebook:
        """Moves and casts keep the codebook's buffers in fp32 (their values and dtype): a
        model cast to bf16 (lmms-eval's `dtype`) would otherwise round the codes and read other
        codes than it was trained on."""
        kept = {name: getattr(self, name) for name in CODEBOOK_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != old.dtype and new.device.type != "meta":
                self._buffers[name] = old.to(new.device)
        return self

    @torch.no_grad()
    def reset_codebook(self) -> None:
        self.codes.copy_(F.normalize(torch.randn_like(self.codes), dim=-1))
        self.code_sum.copy_(self.codes)
        # Count 0: every code no output chose at the first training step restarts at an output
        # of that batch (a data-dependent initialisation).
        self.code_count.zero_()

    @property
    def codebook_size(self) -> int:
        return self.codes.shape[0]

    def codes_of(self, z: torch.Tensor) -> torch.Tensor:
        """The nearest code (largest cosine) of each normalised vector in `z` (..., code_dim),
        scored in fp32 under any autocast: bf16 scores would flip near ties, so a model trained
        under autocast would read other codes than it is evaluated with."""
        with full_precision(z.device):
            scores = z.float().flatten(0, -2) @ self.codes.float().t()
        return scores.argmax(-1).reshape(z.shape[:-1])

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., code_dim): the normalised vectors of `codes`."""
        return F.embedding(codes, self.codes.float())

    @torch.no_grad()
    def update_codebook(
        self,
        z: torch.Tensor,
        codes: torch.Tensor,
        decay: float,
        dead_below: float,
        generator: torch.Generator | None,
    ) -> int:
        """One EMA step of the codebook towards the outputs `z` (n, d) assigned `codes` (n,),
        counts and sums summed over ranks; then every code whose count fell below `dead_below`
        restarts at a random row of `z` (rank 0's, broadcast). Returns the codes restarted."""
        import torch.distributed as dist

        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        finite = torch.isfinite(z).all().float()
        if multi:  # every rank skips together
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite:  # a step the trainer will skip must not poison the codebook for good
            return 0
        k = self.codes.shape[0]
        count = torch.bincount(codes, minlength=k).float()
        total = torch.zeros_like(self.code_sum).index_add_(0, codes, z.float())
        if multi:
            dist.all_reduce(count)
            dist.all_reduce(total)
        self.code_count.mul_(decay).add_(count, alpha=1 - decay)
        self.code_sum.mul_(decay).add_(total, alpha=1 - decay)
        dead = self.code_count < dead_below
        if dead.any():
            pick = torch.randint(len(z), (int(dead.sum()),), generator=generator)
            self.code_sum[dead] = z[pick.to(z.device)].float()
            self.code_count[dead] = 1.0
        if multi:  # every rank restarts the same codes (the counts agree): rank 0's rows
            dist.broadcast(self.code_sum, 0)
        self.codes.copy_(F.normalize(self.code_sum, dim=-1))
        return int(dead.sum())

    def quantise(
        self,
        z: torch.Tensor,
        objective: VQObjectiveConfig,
        generator: torch.Generator | None,
    ) -> Quantised:
        """The training-side quantiser over normalised vectors `z` (..., code_dim): their
        codes, the codebook's EMA step (in a training forward with gradients), the commitment
        loss ||z - sg(e)||^2 and the straight-through vectors (e's values, z's gradient)."""
        codes = self.codes_of(z.detach())
        restarted = 0
        if self.training and torch.is_grad_enabled():
            flat = z.detach().flatten(0, -2)
            restarted = self.update_codebook(
                flat, codes.flatten(), objective.decay, objective.dead_below, generator
            )
        e = self.code_vectors(codes)
        commitment = (z - e).square().sum(-1).mean()
        return Quantised(codes, z + (e - z).detach(), commitment, restarted)

    def usage(self, codes: torch.Tensor) -> dict[str, float]:
        """The share of the codebook `codes` use and the perplexity of their distribution."""
        counts = torch.bincount(codes.flatten(), minlength=self.codebook_size).float()
        p = counts[counts > 0] / counts.sum()
        return {
            "codes_used": float((counts > 0).float().mean()),
            "code_perplexity": float(torch.exp(-(p * p.log()).sum())),
        }


@dataclass
class Quantised:
    codes: torch.Tensor  # long, z's shape without its last dimension
    vectors: torch.Tensor  # straight through: the codes' vectors forward, z's gradient backward
    commitment: torch.Tensor
    restarted: int  # codes restarted by this forward's EMA step


class VQTokenizer(EMACodebook):
    """Pixels (N, 3, H, W) -> codes (N, H/f * W/f), row by row; codes -> pixels."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__(cfg.codebook_size, cfg.code_dim)
        self.cfg = cfg
        ch = cfg.channels
        down: list[nn.Module] = [nn.Conv2d(3, ch[0], 3, padding=1)]
        for c_in, c_out in zip([ch[0], *ch[:-1]], ch):
            down += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), ResBlock(c_out)]
        down += [
            nn.GroupNorm(_groups(ch[-1]), ch[-1]),
            nn.SiLU(),
            nn.Conv2d(ch[-1], cfg.code_dim, 1),
        ]
        self.encoder = nn.Sequential(*down)
        up: list[nn.Module] = [nn.Conv2d(cfg.code_dim, ch[-1], 3, padding=1)]
        for c_in, c_out in zip(ch[::-1], [*ch[::-1][1:], ch[0]]):
            up += [
                ResBlock(c_in),
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c_in, c_out, 3, padding=1),
            ]
        up += [nn.GroupNorm(_groups(ch[0]), ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*up)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.reset_codebook()

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, h, w, code_dim): the encoder's l2-normalised vectors before quantisation."""
        return F.normalize(self.encoder(pixels).permute(0, 2, 3, 1).float(), dim=-1)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, h * w) long: each image's codes, row by row; computed at the weights' own
        precision whatever autocast is on (the same codes in training and evaluation)."""
        with full_precision(pixels.device):
            z = self.latents(pixels.to(self.decoder[0].weight.dtype))
        return self.codes_of(z).flatten(1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, h * w) codes -> (N, 3, H, W) pixels (in the processor's normalised space)."""
        side = math.isqrt(codes.shape[1])
        if side * side != codes.shape[1]:
            raise ValueError(f"{codes.shape[1]} codes per image do not make a square grid")
        z = self.code_vectors(codes).reshape(codes.shape[0], side, side, -1)
        return self.decoder(z.permute(0, 3, 1, 2).to(self.decoder[0].weight.dtype))


class VQModel(nn.Module):
    """The tokenizer (`vision`, the name an MLLM's `train.init.vision` reads it under) and its
    training: reconstruction + beta x commitment, and the codebook's EMA step in each training
    forward."""

    gathered = False  # the loss is this rank's mean (each image weighs the same on every rank)

    def __init__(self, cfg: VQConfig, objective: VQObjectiveConfig) -> None:
        super().__init__()
        self.vision = VQTokenizer(cfg)
        self.objective = objective

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> EncoderOutput:
        vq, o = self.vision, self.objective
        q = vq.quantise(vq.latents(pixel_values), o, generator)
        recon = vq.decoder(q.vectors.permute(0, 3, 1, 2).to(pixel_values.dtype))
        reconstruction = (recon.float() - pixel_values.float()).square().mean()
        loss = reconstruction + o.beta * q.commitment
        metrics = {
            "reconstruction": float(reconstruction.detach()),
            "commitment": float(q.commitment.detach()),
            **vq.usage(q.codes),
            "codes_restarted": float(q.restarted),
        }
        return EncoderOutput(loss, metrics)
