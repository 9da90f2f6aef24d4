"""MFU's denominator: the device's dense bf16 peak, by the name torch reports."""

from __future__ import annotations

import pytest

from mm1.train.hardware import H100_SXM_BF16_PEAK, bf16_peak_flops


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),  # not the SXM figure, though it contains "H100"
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L40S", 362e12),
        ("AMD Instinct MI300X", 1307e12),
    ],
)
def test_known_devices(name: str, peak: float) -> None:
    assert bf16_peak_flops(name) == peak


def test_an_unknown_device_has_no_peak() -> None:
    """MFU is then left out of the metrics, rather than computed against another card's peak."""
    assert bf16_peak_flops("NVIDIA GeForce RTX 4090") is None
    assert bf16_peak_flops("NVIDIA H100 80GB HBM3") == H100_SXM_BF16_PEAK
