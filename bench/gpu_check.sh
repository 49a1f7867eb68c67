#!/usr/bin/env bash
# The one script run on the GPU machine: builds the CUDA variant (dev build, sm_90), prints
# `python -m zeroshard.env`, runs the GPU tests, measures the fused mixed-precision Adam step
# against device copy bandwidth, runs the benchmarks other scripts provide when present, and
# prints a summary table last. Every step has its own time limit (whole run well under 8 min);
# logs go to $OUT (or ./gpu_check_out). No network needed.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
BUILD=${ZS_GPU_BUILD_DIR:-build-gpu}
ARCHS=${CUDAARCHS:-90}
JOBS=$(nproc 2>/dev/null || echo 8)
declare -a SUMMARY=()
started=$(date +%s)

note() { SUMMARY+=("$(printf '%-22s %s' "$1" "$2")"); }
section() { printf '\n==== %s (%ss elapsed) ====\n' "$1" "$(( $(date +%s) - started ))"; }
# run NAME LIMIT_S CMD...: output to the terminal and $OUT_DIR/NAME.log; returns the command's rc.
run() {
  local name=$1 limit=$2
  shift 2
  section "$name"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  return "${PIPESTATUS[0]}"
}

section "machine"
{ nvidia-smi -L; nvcc --version | tail -1; "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())'; } \
  2>&1 | tee "$OUT_DIR/machine.log"

# ---- build ----------------------------------------------------------------------------------
bench_flag=OFF
[ -f bench/CMakeLists.txt ] && bench_flag=ON
PY_EXE=$(command -v "$PY")
if run configure 120 cmake -S . -B "$BUILD" -G Ninja -DZEROSHARD_CUDA=ON \
     -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" -DZEROSHARD_BUILD_TESTS=OFF \
     -DZEROSHARD_BUILD_BENCH=$bench_flag -DPython3_EXECUTABLE="$PY_EXE" \
     -DPython_EXECUTABLE="$PY_EXE" \
   && run build 300 ninja -C "$BUILD" -j "$JOBS"; then
  note build "ok (sm_$ARCHS, $(( $(date +%s) - started ))s)"
else
  note build "FAILED (see $OUT_DIR/build.log)"
  printf '\n==== summary ====\n'; printf '%s\n' "${SUMMARY[@]}"
  exit 1
fi
export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}

# ---- environment report -----------------------------------------------------------------------
if run env 60 "$PY" -m zeroshard.env; then
  note "zeroshard.env" "$(grep -E '^nccl loaded' "$OUT_DIR/env.log" | tr -s ' ')"
else
  note "zeroshard.env" "FAILED"
fi

# ---- tests ------------------------------------------------------------------------------------
run pytest 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
  --junitxml="$OUT_DIR/pytest.xml" tests/python/test_gpu_ops.py tests/python/test_gpu_nccl.py
rc=$?
note "gpu tests" "rc=$rc: $(grep -E '(passed|failed|error|skipped)' "$OUT_DIR/pytest.log" | tail -1)"

# ---- fused step vs copy bandwidth ---------------------------------------------------------------
run step_bandwidth 150 "$PY" - <<'EOF'
# Mixed-precision AdamW step on 2^30 elements: bf16 grad in, fp32 param/exp_avg/exp_avg_sq
# read+written, bf16 copy out = 30 bytes/param; compared with a 4 GiB device-to-device copy.
import torch
from zeroshard import ops

n = 1 << 30
dev = "cuda"


def timed(fn, iters=10):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


src = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
dst = torch.empty_like(src)
copy_s = timed(lambda: dst.copy_(src))
copy_bw = 2 * 4 * n / copy_s / 1e9
del src, dst
param = torch.randn(n, device=dev)
grad = torch.randn(n, device=dev).bfloat16()
m, v = torch.zeros_like(param), torch.zeros_like(param)
copy = torch.empty(n, dtype=torch.bfloat16, device=dev)
flag = torch.zeros(1, dtype=torch.int32, device=dev)
hp = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, step=1, param_copy=copy)
plain_s = timed(lambda: ops.adam_step(param, grad, m, v, check_finite=False, **hp))
checked_s = timed(lambda: ops.adam_step(param, grad, m, v, check_finite=True, found_inf=flag, **hp))
step_bw = 30 * n / plain_s / 1e9
checked_bw = 30 * n / checked_s / 1e9
print(f"copy_bandwidth {copy_bw:.0f} GB/s")
print(f"adam_step {step_bw:.0f} GB/s = {100 * step_bw / copy_bw:.1f}% of copy ({plain_s * 1e3:.2f} ms)")
print(f"adam_step_checked {checked_bw:.0f} GB/s = {100 * checked_bw / copy_bw:.1f}% of copy "
      f"({checked_s * 1e3:.2f} ms, counting 30 B/param; includes the finiteness pass)")
x = torch.randn(n, device=dev).bfloat16()
norm_s = timed(lambda: ops.l2_norm_sq(x))
print(f"l2_norm_sq_bf16 {2 * n / norm_s / 1e9:.0f} GB/s ({norm_s * 1e3:.2f} ms)")
EOF
if [ $? -eq 0 ]; then
  bw() { grep -E "^$1 " "$OUT_DIR/step_bandwidth.log" | cut -d' ' -f2-; }
  note "adam step 30B/param" "$(bw adam_step)"
  note "  + finite check" "$(bw adam_step_checked)"
  note "device copy" "$(bw copy_bandwidth)"
  note "l2 norm bf16" "$(bw l2_norm_sq_bf16)"
else
  note "step bandwidth" "FAILED (see $OUT_DIR/step_bandwidth.log)"
fi

# ---- other engineers' benchmarks, when present ----------------------------------------------------
if [ -f bench/bench_ops.py ]; then
  run bench_ops 120 "$PY" bench/bench_ops.py --device cuda
  note "bench_ops.py" "rc=$? (log: bench_ops.log)"
else
  note "bench_ops.py" "absent"
fi
zs_bench=$(ls -1 "$BUILD"/bench/zs_bench build*/bench/zs_bench 2>/dev/null | head -1)
if [ -n "$zs_bench" ] && [ -x "$zs_bench" ]; then
  run zs_bench 120 "$zs_bench"
  note "zs_bench" "rc=$? ($zs_bench)"
else
  note "zs_bench" "absent"
fi

# ---- ZeRO on the GPU: the example over NCCL (world size 1), then a GPT-2-medium step ----------
run example_nccl 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
  examples/train_gpt.py --device cuda --model small --stage 2 --dtype bf16 --steps 30
note "example (nccl)" "rc=$? $(grep -E '^final loss' "$OUT_DIR/example_nccl.log" | cut -c1-60)"
run zero_step 200 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
  bench/bench_zero_step.py --device cuda --model gpt2-medium --stage 2 --json "$OUT_DIR/zero_step.json"
note "gpt2-medium step" "rc=$? $(grep -E '^ratio' "$OUT_DIR/zero_step.log")"

printf '\n==== summary (%ss) ====\n' "$(( $(date +%s) - started ))" | tee "$OUT_DIR/summary.txt"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$OUT_DIR/summary.txt"
