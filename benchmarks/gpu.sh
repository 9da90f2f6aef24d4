#!/usr/bin/env bash
# GPU benchmark of the MM1 ablation model (ViT-L/14 336 + C-Abstractor 144 + 1.2B decoder,
# bf16, FSDP2 on one GPU through torchrun): one command, under 5 minutes on one H100 / H200.
#
#   bash benchmarks/gpu.sh              # on the GPU machine
#   bash benchmarks/gpu.sh --cpu-smoke  # the same code path on the CPU, tiny shapes
#
# Variants: attention (micro-benchmark), eager / flex / compile (FSDP2 training step, MFU) from
# gpu_bench.py, llava (mm1 against transformers' LLaVA, same weights) from gpu_llava.py, moe
# (the MoE layer against a dense SwiGLU of the same active parameters, bf16, E = 8 and 64, at
# the ablation width) from moe_layer.py, and decode (bf16 generation with mm1's compiled,
# CUDA-graph decode step against mm1 eager and transformers) from gpu_llava.py --decode.
#
# Each variant runs under its own `timeout` and writes benchmarks/results/gpu/<variant>.json
# (gpu-smoke/ with --cpu-smoke) as soon as it finishes; a variant that fails or runs out of
# time gets a JSON saying so. Needs python with torch; mm1 is used from src/ (PYTHONPATH), and
# mm1.config's only third-party needs, omegaconf and PyYAML, are installed offline from
# benchmarks/wheels/ (cp312 manylinux) into a scratch directory when they are missing.
# Environment: PYTHON (default python3), OUT_DIR, and extra arguments for gpu_bench.py after
# the flags, e.g. `bash benchmarks/gpu.sh --seq-len 2048`.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SMOKE=()
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  SMOKE=(--cpu-smoke)
  shift
fi
EXTRA=("$@")
# VARIANTS="llava eager" bash benchmarks/gpu.sh runs only those, in that order: put first what
# matters most, since a device allowance that runs out keeps only the variants that finished.
KNOWN="attention eager flex compile llava decode moe"
VARIANTS=${VARIANTS:-$KNOWN}
for v in $VARIANTS; do
  if [[ " $KNOWN " != *" $v "* ]]; then echo "unknown variant $v (known: $KNOWN)"; exit 2; fi
done
if [[ ${#SMOKE[@]} -gt 0 ]]; then
  OUT=${OUT_DIR:-benchmarks/results/gpu-smoke}
else
  OUT=${OUT_DIR:-benchmarks/results/gpu}
fi
mkdir -p "$OUT"
START=$(date +%s)

if ! "$PY" -c "import omegaconf, yaml" 2>/dev/null; then
  SITE=${TMPDIR:-/tmp}/mm1-bench-site
  echo "installing omegaconf + PyYAML from benchmarks/wheels into $SITE"
  if ! "$PY" -m pip install -q --no-index --find-links benchmarks/wheels --target "$SITE" omegaconf; then
    # No pip: a wheel is a zip archive whose root goes on sys.path.
    for w in benchmarks/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$SITE"; done
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

stub() {  # variant, status, seconds
  "$PY" - "$OUT/$1.json" "$1" "$2" "$3" <<'EOF'
import json, sys
path, variant, status, limit = sys.argv[1:]
json.dump({"variant": variant, "status": status, "limit_s": int(limit)}, open(path, "w"), indent=2)
EOF
}

run() {  # variant, time limit in seconds, launcher and script with its arguments...
  local variant=$1 limit=$2
  shift 2
  echo "=== $variant (limit ${limit}s)"
  rm -f "$OUT/$variant.json"
  # ${a[@]+"${a[@]}"}: empty arrays are safe under `set -u` on bash < 4.4 too
  timeout --kill-after=15 "$limit" "$@" --out "$OUT" \
    ${SMOKE[@]+"${SMOKE[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
  local rc=$?
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    stub "$variant" timeout "$limit"
  elif [[ $rc -ne 0 ]]; then
    stub "$variant" "failed (exit $rc)" "$limit"
  fi
}

TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)
BENCH=benchmarks/gpu_bench.py
if [[ ${#SMOKE[@]} -gt 0 ]]; then MOE_ARGS=(); else MOE_ARGS=(--device cuda --dtype bf16); fi
for variant in $VARIANTS; do
  case $variant in
    attention) run attention 40 "$PY" $BENCH attention ;;
    eager | flex) run "$variant" 70 "${TORCHRUN[@]}" $BENCH "$variant" ;;
    compile) run compile 110 "${TORCHRUN[@]}" $BENCH compile ;;
    llava) run llava 240 "$PY" benchmarks/gpu_llava.py ;;
    decode) run decode 180 "$PY" benchmarks/gpu_llava.py --decode ;;
    moe) run moe 90 "$PY" -m benchmarks.moe_layer ${MOE_ARGS[@]+"${MOE_ARGS[@]}"} ;;
  esac
done

"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'variant':<10} {'status':<16} {'tokens/s':>10} {'MFU dec':>8} {'MFU all':>8} "
      f"{'all(row)':>8} {'mem GiB':>8}")
for v in ("eager", "compile", "flex", "attention", "llava", "moe", "decode"):
    f = out / f"{v}.json"
    if not f.exists():
        continue
    d = json.loads(f.read_text())
    if v == "llava" and d.get("status") == "ok":
        s = d["summary"]
        print("llava      train mm1/LLaVA " + ", ".join(
            f"{k} {r:.2f}x" for k, r in s["train_tokens_per_s_ratio"].items()))
        print("           generate mm1/HF " + ", ".join(
            f"b{k} {r:.2f}x" for k, r in s["generation_ratio"].items())
            + f"; fp32 tokens identical: {s['fp32_tokens_identical']}")
        continue
    if v == "decode" and d.get("generation"):
        print(f"decode     {d.get('status', '?')}: " + ", ".join(
            f"b{g['batch']} compiled/HF {g['compiled_ratio']:.2f}x, eager/HF {g['ratio']:.2f}x "
            f"(compile {g['compiled_warmup_s']:.0f} s)" for g in d["generation"]))
        continue
    if v == "moe" and d.get("status") == "ok":
        print("moe        moe/dense " + ", ".join(
            f"E={r['experts']} {r['moe_over_dense']:.2f}x (grouped_mm: {r['grouped_mm_used']})"
            for r in d["results"]))
        continue
    if v == "attention" and d.get("status") == "ok":
        flex = d.get("flex_document_ms")
        print(f"{v:<10} sdpa mask {d['sdpa_dense_mask_ms']:.2f} ms, grouped {d['grouped_ms']:.2f} ms, "
              f"causal {d['sdpa_causal_row_ms']:.2f} ms, flex {flex if flex is None else round(flex, 2)} ms")
        continue
    mem = d.get("peak_memory_gib")
    print(f"{v:<10} {d.get('status', '?'):<16} {d.get('tokens_per_s', 0):>10.0f} "
          f"{d.get('mfu_decoder_only', 0):>8.1%} {d.get('mfu_with_encoder', 0):>8.1%} "
          f"{d.get('mfu_with_encoder_row_attention', 0):>8.1%} "
          f"{'' if mem is None else f'{mem:.1f}':>8}")
EOF
echo "total $(( $(date +%s) - START ))s; JSON in $OUT"
