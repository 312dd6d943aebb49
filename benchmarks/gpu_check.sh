#!/usr/bin/env bash
# Everything to run on a lent GPU in one call (see ../shared/GPU.md): build, the whole
# test suite with CUDA parametrization, compute-sanitizer memcheck and racecheck over a
# small CUDA subset, and the GPU benchmark. Logs go to $OUT (or ./gpu-logs).
set -uo pipefail
OUT="${OUT:-$PWD/gpu-logs}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "== build ok"
python3 -m pytest -q -x tests > "$OUT/pytest.log" 2>&1; echo "== pytest rc=$?"; tail -3 "$OUT/pytest.log"
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 9 python3 -m pytest -q -x tests/test_cuda.py \
      -k "matches_cpu or backward_on_cuda" > "$OUT/sanitizer_$tool.log" 2>&1
    echo "== compute-sanitizer $tool rc=$?"; tail -2 "$OUT/sanitizer_$tool.log"
  done
else
  echo "== compute-sanitizer not found"
fi
python3 benchmarks/bench_gpu.py ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1; echo "== bench rc=$?"
cp benchmarks/results/gpu_*.md "$OUT/" 2>/dev/null
tail -25 "$OUT/bench.log"
