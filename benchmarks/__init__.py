"""mm1 benchmarks: `python -m benchmarks.run_cpu` (CPU set) and `benchmarks/gpu.sh` (one GPU)."""
