"""Optimizer and learning-rate schedule of the MM1 recipe."""

from __future__ import annotations

import math


def mm1_peak_lr(num_params: int) -> float:
    """MM1's peak learning rate for a decoder of `num_params` parameters:
    exp(-0.4214 ln N - 0.5535), fit on 9M..1.2B models (≈5.8e-5 at 3B, 2.2e-5 at 30B)."""
    if num_params <= 0:
        raise ValueError(f"num_params={num_params} must be positive")
    return math.exp(-0.4214 * math.log(num_params) - 0.5535)
