"""Dense bf16 peak FLOP/s of accelerators, the denominator of MFU (datasheet figures without
sparsity; a measured large matmul reaches about 80% of them)."""

from __future__ import annotations

# Matched as substrings of `torch.cuda.get_device_name()`, most specific first ("NVIDIA H100
# PCIe" before "H100", which stands for the SXM part: "NVIDIA H100 80GB HBM3").
BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("MI300X", 1307e12),
)

H100_SXM_BF16_PEAK = 989e12  # what the GPU benchmarks report MFU against (docs/benchmarks.md)


def bf16_peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of the named device, or None for one not in the table (MFU is then
    not reported rather than reported against the wrong peak)."""
    for key, peak in BF16_PEAK_FLOPS:
        if key in device_name:
            return peak
    return None
