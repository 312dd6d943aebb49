#!/usr/bin/env bash
# Everything to check on a lent GPU machine in one call (see ../shared/GPU.md), inside a
# global deadline (480 s by default), the most valuable stage first:
#
#   stage      cap  min  what
#   env         30s   5s  nvidia-smi -L, python/torch/CUDA versions, nvcc, compute-sanitizer
#   build      200s  60s  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext
#                         --inplace, then: hessmlp imports and its CUDA kernels are registered
#   tests      150s  30s  pytest -q -rfE tests -k cuda: all of tests/test_cuda.py (the module
#                         name matches) and every case parametrized on device 'cuda'; no -x
#   bench      110s  30s  benchmarks/bench_gpu.py --quick (torch.compile baselines included:
#                         their cold compiles take most of it); table copied to $OUT/gpu_<name>.md
#   memcheck    45s  20s  compute-sanitizer --tool memcheck over a few small CUDA tests
#                         (PyTorch's caching allocator off, so out-of-bounds accesses are seen)
#   racecheck   45s  20s  compute-sanitizer --tool racecheck over the same tests
#
# Each stage runs under `timeout --signal=TERM --kill-after=10` for min(its cap, the time left
# before the deadline less the minimum slots (min + 10 s) of the stages after it), so a slow
# stage trims the later ones but never starves them; a stage left less than its minimum is
# skipped ("no time left": only when the deadline is set below the sum of the minimums).
# A build that fails, times out or is skipped skips everything after it.
#
# Output, all in $OUT (default ./gpu-logs), written as it goes, 7 files at most (the device
# tool returns 8): verdict.txt (environment lines, then one line per stage as it ends:
# `stage  PASS|FAIL rc=N|TIMEOUT|SKIP (reason)  NNs  summary`), build.log, tests.log,
# bench.log, memcheck.log, racecheck.log, gpu_<name>.md. Verdict lines also go to stdout,
# and verdict.txt is printed whole at the end. Exit status: 0 if every stage that ran
# passed (and the build did run), else 1. Outside a dry run, a tests or sanitizer stage in
# which nothing passed (all skipped: no GPU seen) fails.
#
# Environment:
#   OUT                       where the files go (default ./gpu-logs)
#   GPU_CHECK_DRY_RUN=1       no GPU: CPU stand-ins (no nvidia-smi; build = import the built
#                             CPU extension; tests = tests/test_cuda.py, all skipped, plus a
#                             small CPU subset; bench on cpu, small and without torch.compile;
#                             sanitizer stages skipped where compute-sanitizer is absent)
#   GPU_CHECK_DEADLINE        the global deadline in seconds (default 480)
#   GPU_CHECK_SCALE           multiplies the deadline, every cap and minimum (default 1; e.g. 2
#                             on a slow machine)
#   GPU_CHECK_CAP_<STAGE>     one stage's cap in seconds, STAGE in ENV BUILD TESTS BENCH
#                             MEMCHECK RACECHECK (before scaling)
#   GPU_CHECK_TESTS_K         the tests stage's -k expression
#   GPU_CHECK_SANITIZER_K     the sanitizer stages' -k expression (over tests/test_cuda.py)
#   GPU_CHECK_BENCH_ARGS      the bench's arguments (replacing the defaults, --out excepted)
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST   passed to the build (default 16 and 9.0)
#
# On the device machine, with timeout_s of 540 or more:
#   bash benchmarks/gpu_check.sh
# Dry run anywhere (the CPU extension built in place first):
#   OUT=/tmp/gpucheck GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh
set -uo pipefail

OUT="${OUT:-$PWD/gpu-logs}"
mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)" || exit 1
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
DRY="${GPU_CHECK_DRY_RUN:-0}"
[[ "$DRY" == "0" ]] && DRY=""
SCALE="${GPU_CHECK_SCALE:-1}"
KILL_AFTER=10   # a stage can outlive its timeout by this much
RESERVE=5       # kept for the closing lines
# The extension is built in place, not installed: the scripts under benchmarks/ import it
# from the repository root.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"

scaled() {  # scaled SECONDS -> SECONDS * SCALE, rounded, at least 1
  awk -v s="$1" -v k="$SCALE" 'BEGIN { v = int(s * k + 0.5); print (v < 1 ? 1 : v) }'
}
DEADLINE=$(scaled "${GPU_CHECK_DEADLINE:-480}")

STAGES=(env build tests bench memcheck racecheck)
declare -A CAP=([env]=30 [build]=200 [tests]=150 [bench]=110 [memcheck]=45 [racecheck]=45)
declare -A MIN=([env]=5 [build]=60 [tests]=30 [bench]=30 [memcheck]=20 [racecheck]=20)
for s in "${STAGES[@]}"; do
  var="GPU_CHECK_CAP_${s^^}"
  CAP[$s]=$(scaled "${!var:-${CAP[$s]}}")
  MIN[$s]=$(scaled "${MIN[$s]}")
  (( MIN[$s] > CAP[$s] )) && MIN[$s]=${CAP[$s]}
done

VERDICT="$OUT/verdict.txt"
: > "$VERDICT"
rm -f "$OUT"/gpu_*.md
FAILED=0
NO_BUILD=""   # why the stages after the build cannot run, once they cannot
BENCH_TMP="$(mktemp -d)"
trap 'rm -rf "$BENCH_TMP"' EXIT

note() {  # an environment line: verdict.txt and stdout
  printf '%s\n' "$*" | tee -a "$VERDICT"
}

verdict() {  # verdict STAGE STATUS SECONDS SUMMARY
  local line
  line=$(printf '%-9s %-27s %4ss  %s' "$1" "$2" "$3" "${4:0:160}" | sed -E 's/ +$//')
  printf '%s\n' "$line" | tee -a "$VERDICT"
  case "$2" in PASS|SKIP*) ;; *) FAILED=1 ;; esac
}

last_output() {  # the last non-blank line of log $1, shortened
  grep -v '^[[:space:]]*$' "$1" | tail -1 | cut -c1-100
}

# The budget of stage $1: its cap, but never more than the time left before the deadline less
# the minimum slots (minimum + kill-after) of the stages after it. Prints 0 when too little.
budget() {
  local stage=$1 later=0 seen="" s left b
  for s in "${STAGES[@]}"; do
    [[ -n "$seen" ]] && later=$(( later + MIN[$s] + KILL_AFTER ))
    [[ "$s" == "$stage" ]] && seen=1
  done
  left=$(( DEADLINE - SECONDS - RESERVE - later - KILL_AFTER ))
  b=${CAP[$stage]}
  (( left < b )) && b=$left
  (( b < MIN[$stage] )) && b=0
  echo "$b"
}

# run_stage STAGE LOG CMD...: runs CMD under its budget, output to LOG (appended as it goes).
# Sets RC (124 on timeout), T (seconds) and B (the budget; 0: skipped, nothing run).
run_stage() {
  local stage=$1 log=$2 t0
  shift 2
  B=$(budget "$stage")
  RC=0 T=0
  if (( B == 0 )); then
    return
  fi
  echo "== $stage: start, ${B}s budget (cap ${CAP[$stage]}s, $(( DEADLINE - SECONDS ))s to the deadline)"
  t0=$SECONDS
  timeout --signal=TERM --kill-after="$KILL_AFTER" "$B" "$@" >> "$log" 2>&1
  RC=$?
  T=$(( SECONDS - t0 ))
  (( RC == 137 && T >= B )) && RC=124   # killed after the grace period: a timeout too
}

status_of() {  # the status word for RC (and budget B)
  if (( RC == 0 )); then echo PASS
  elif (( RC == 124 )); then echo "TIMEOUT (${B}s)"
  else echo "FAIL rc=$RC"
  fi
}

pytest_summary() {  # the last pytest result line of log $1, without the ===
  grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)|no tests ran' "$1" \
    | grep -v 'ERROR SUMMARY' | tail -1 | sed -E 's/^=+ //; s/ =+$//'
}

show_failures() {  # FAILED/ERROR lines of a pytest log $1 to stdout
  grep -E '^(FAILED|ERROR) ' "$1" | head -30
}

find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer 2> /dev/null)" /usr/local/cuda/bin/compute-sanitizer \
      /usr/local/cuda/compute-sanitizer/compute-sanitizer \
      "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
      "$(dirname "$(readlink -f "$(command -v nvcc 2> /dev/null || echo /nonexistent/nvcc)")")/compute-sanitizer"; do
    if [[ -n "$c" && -x "$c" ]]; then
      echo "$c"
      return
    fi
  done
}
SANITIZER="$(find_sanitizer)"

# ---------------------------------------------------------------- 1. environment
note "gpu_check $(date -u '+%Y-%m-%d %H:%M:%SZ')  deadline ${DEADLINE}s  scale ${SCALE}$([[ -n "$DRY" ]] && echo '  DRY RUN (CPU stand-ins)')"
note "git $(git rev-parse --short HEAD 2> /dev/null || echo '?')$([[ -n "$(git status --porcelain 2> /dev/null)" ]] && echo ' (with uncommitted changes)')  $(nproc) cores"
if [[ -n "$DRY" ]]; then
  ENV_CMD='echo "nvidia-smi: not run (dry run)"'
else
  ENV_CMD='nvidia-smi -L || { echo "nvidia-smi -L failed"; rc=1; }'
fi
# shellcheck disable=SC2016  # expanded by the inner bash
ENV_CMD+='
python3 -c "
import os, sys, torch
ok = torch.cuda.is_available()
print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"| CUDA\", torch.version.cuda,
      \"| cuda available:\", ok, \"|\", torch.cuda.get_device_name(0) if ok else \"no device\")
sys.exit(0 if ok or os.environ.get(\"DRY\") else 1)
" || rc=1
if command -v nvcc > /dev/null; then
  echo "nvcc: $(nvcc --version | grep -E "release|^Build" | tr "\n" " " | sed -E "s/ +$//")"
else
  echo "nvcc: not found"; [[ -n "$DRY" ]] || rc=1
fi
if [[ -n "$SANITIZER" ]]; then
  echo "compute-sanitizer: $SANITIZER, $("$SANITIZER" --version | grep -i version | tail -1)"
else
  echo "compute-sanitizer: not found"
fi
exit "${rc:-0}"'
N=$(wc -l < "$VERDICT")
run_stage env "$VERDICT" env DRY="$DRY" SANITIZER="$SANITIZER" bash -c "$ENV_CMD"
tail -n +"$(( N + 1 ))" "$VERDICT"   # its lines went to verdict.txt as they came: show them
if (( B == 0 )); then
  verdict env "SKIP (no time left)" 0 ""
else
  verdict env "$(status_of)" "$T" "$([[ -n "$DRY" ]] && echo 'dry run')"
fi

# ---------------------------------------------------------------- 2. build
LOG="$OUT/build.log"
: > "$LOG"
CHECK_PY='
import os, torch, hessmlp
key = "CPU" if os.environ.get("DRY") else "CUDA"
has = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
if has is None:
    print("hessmlp imports (kernel registration not checkable on this torch)")
else:
    ops = ["mlp_jet", "mlp_jet_backward", "stage_derivs"]
    missing = [op for op in ops if not has("hessmlp::" + op, key)]
    assert not missing, "no %s kernel registered for %s" % (key, missing)
    print("hessmlp imports; %s kernels registered (%s)" % (key, ", ".join(ops)))
'
if [[ -n "$DRY" ]]; then
  run_stage build "$LOG" env DRY=1 python3 -c "$CHECK_PY"
else
  # shellcheck disable=SC2016  # $1 is the inner bash's
  run_stage build "$LOG" bash -c 'python3 setup.py build_ext --inplace && python3 -c "$1"' _ "$CHECK_PY"
fi
if (( B == 0 )); then
  verdict build "SKIP (no time left)" 0 ""
  NO_BUILD="no build" FAILED=1   # nothing else can run: not a pass
elif (( RC == 0 )); then
  verdict build PASS "$T" "$(tail -1 "$LOG")"
else
  NO_BUILD="build failed"
  echo "-- build.log, last lines:"
  tail -25 "$LOG"
  verdict build "$(status_of)" "$T" "$(grep -m1 -E '(^|[ :])error[: ]|Error:|^FAILED:' "$LOG" || last_output "$LOG")"
fi

# ---------------------------------------------------------------- 3. tests
# One pytest run: -k cuda selects all of tests/test_cuda.py (its module name matches) and the
# cases parametrized on device 'cuda' elsewhere. No -x: every failure is listed (-rfE).
LOG="$OUT/tests.log"
: > "$LOG"
if [[ -n "$DRY" ]]; then
  TESTS_K="${GPU_CHECK_TESTS_K:-cuda or (test_hessian and float64 and tanh)}"
else
  TESTS_K="${GPU_CHECK_TESTS_K:-cuda}"
fi
if [[ -n "$NO_BUILD" ]]; then
  verdict tests "SKIP ($NO_BUILD)" 0 ""
else
  run_stage tests "$LOG" python3 -m pytest -q -rfE -p no:cacheprovider --durations=10 tests -k "$TESTS_K"
  if (( B == 0 )); then
    verdict tests "SKIP (no time left)" 0 ""
  else
    SUMMARY="$(pytest_summary "$LOG")"
    if (( RC == 0 )) && [[ -z "$DRY" && "$SUMMARY" != *passed* ]]; then
      RC=1 SUMMARY="nothing passed: $SUMMARY"
    fi
    [[ -z "$SUMMARY" ]] && SUMMARY="last output: $(last_output "$LOG")"
    (( RC != 0 )) && show_failures "$LOG"
    verdict tests "$(status_of)" "$T" "$SUMMARY"
  fi
fi

# ---------------------------------------------------------------- 4. bench
LOG="$OUT/bench.log"
: > "$LOG"
if [[ -n "$DRY" ]]; then
  read -r -a BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:---device cpu --quick --min-log2 8 --max-log2 10 --no-compile}"
else
  read -r -a BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:---quick}"
fi
if [[ -n "$NO_BUILD" ]]; then
  verdict bench "SKIP ($NO_BUILD)" 0 ""
else
  run_stage bench "$LOG" python3 benchmarks/bench_gpu.py "${BENCH_ARGS[@]}" --out "$BENCH_TMP"
  if (( B == 0 )); then
    verdict bench "SKIP (no time left)" 0 ""
  else
    ROWS=$(grep -c "^{'B'" "$LOG")
    SUMMARY="$ROWS rows"
    for f in "$BENCH_TMP"/gpu_*.md; do
      [[ -f "$f" ]] || continue
      name="$(basename "$f" .md)"
      name="${name//[^A-Za-z0-9._-]/_}"
      cp "$f" "$OUT/${name:0:80}.md"
      SUMMARY+="; ${name:0:80}.md; $(awk -F'|' '$3 ~ /hessian/ { r = $2 "hessian " $4 "ms," $5 "eager," $6 "compiled" }
        END { gsub(/  +/, " ", r); gsub(/^ +| +$/, "", r); print r }' "$f")"
    done
    (( RC != 0 )) && { tail -15 "$LOG"; SUMMARY+="; last output: $(last_output "$LOG")"; }
    verdict bench "$(status_of)" "$T" "$SUMMARY"
  fi
fi

# ---------------------------------------------------------------- 5. compute-sanitizer
SAN_K="${GPU_CHECK_SANITIZER_K:-matches_cpu and float64 or backward_on_cuda}"
for tool in memcheck racecheck; do
  LOG="$OUT/$tool.log"
  : > "$LOG"
  if [[ -n "$NO_BUILD" ]]; then
    verdict "$tool" "SKIP ($NO_BUILD)" 0 ""
    continue
  fi
  if [[ -z "$SANITIZER" ]]; then
    echo "compute-sanitizer not found (PATH, /usr/local/cuda, CUDA_HOME, beside nvcc)" >> "$LOG"
    verdict "$tool" "SKIP (no compute-sanitizer)" 0 ""
    continue
  fi
  # memcheck: each tensor its own cudaMalloc, or out-of-bounds accesses inside the caching
  # allocator's blocks go unseen. API errors are not counted: torch's own probing calls
  # (handled, by design) would fail the stage; the tests catch the extension's launch errors.
  # (torch reads the variable as set or not, whatever its value: unset it for racecheck.)
  CACHE=(-u PYTORCH_NO_CUDA_MEMORY_CACHING)
  [[ "$tool" == memcheck ]] && CACHE=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  run_stage "$tool" "$LOG" env "${CACHE[@]}" \
    "$SANITIZER" --tool "$tool" --error-exitcode 9 --report-api-errors no --print-limit 100 \
    python3 -m pytest -q -rfE -p no:cacheprovider tests/test_cuda.py -k "$SAN_K"
  if (( B == 0 )); then
    verdict "$tool" "SKIP (no time left)" 0 ""
  else
    SUMMARY="$(grep -E 'ERROR SUMMARY' "$LOG" | tail -1 | sed -E 's/^=+ *//'); $(pytest_summary "$LOG")"
    if (( RC == 0 )) && [[ -z "$DRY" && "$SUMMARY" != *passed* ]]; then
      RC=1 SUMMARY="nothing passed: $SUMMARY"
    fi
    [[ "$SUMMARY" == "; " ]] && SUMMARY="last output: $(last_output "$LOG")"
    (( RC != 0 )) && { grep -m10 -E '^=+ +(Invalid|Race|Error|.*hazard)' "$LOG"; show_failures "$LOG"; }
    verdict "$tool" "$(status_of)" "$T" "$SUMMARY"
  fi
done

echo
echo "== verdict.txt ($SECONDS s of ${DEADLINE}s; files in $OUT)"
cat "$VERDICT"
exit "$FAILED"
