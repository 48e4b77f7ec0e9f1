#!/bin/bash
# One GPU round on the device machine: GPU tests file by file, then benchmarks, each under its own time limit,
# results gathered into few files under $OUT (the device tool returns a limited number of files).
#
#   TESTS="tests/test_moe_gpu.py tests/test_indexer_gpu.py" BENCHES="moe indexer" bash tools/gpu_round.sh
#   TUNE="linear indexer_logits topk_select" TESTS=" " BENCHES="linear" bash tools/gpu_round.sh
#
# Defaults: every tests/test_*_gpu.py, every benchmark. TEST_LIMIT / BENCH_LIMIT: seconds per file / benchmark.
# A kernel cache exported here is imported first, so that nothing compiles there that was built here:
#   tilev4 compile --arch sm_90a && tilev4 cache export .whl/aot.tar.xz --current-toolchain [--kernel K ...]
# (the device tool carries 64 MiB in all, .device included: name the kernels the round needs).
set -u
OUT=${OUT:-/tmp/gpu-round}; mkdir -p "$OUT"
source .device/activate
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=${PYTHONPATH:-}:/tmp/site:$PWD TILEV4_TILELANG_LOG_LEVEL=WARNING
export TILEV4_COMMIT=${TILEV4_COMMIT:-$(cat .whl/commit 2>/dev/null || echo unknown)}
TESTS=${TESTS:-$(ls tests/test_*_gpu.py)}
BENCHES=${BENCHES:-all}
TEST_LIMIT=${TEST_LIMIT:-240}; BENCH_LIMIT=${BENCH_LIMIT:-120}
t0=$(date +%s); log="$OUT/round.log"; summary="$OUT/summary.txt"
note() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$summary"; }
python3 -m tilev4 info > "$log" 2>&1
for a in .whl/aot.tar.xz .whl/aot.tar.gz; do
  [ -f "$a" ] && python3 -m tilev4 cache import "$a" >> "$log" 2>&1 && note "cache imported from $a"
done
if [ -n "${TUNE:-}" ]; then  # TUNE="linear indexer_logits": tune those kernels first (candidates built here with
  # `tilev4 tune --compile-only --arch sm_90a --kernel K …` and carried in the export), report under $OUT
  args=""; for k in $TUNE; do args="$args --kernel $k"; done
  timeout -s KILL "${TUNE_LIMIT:-300}" python3 -m tilev4 tune --jobs 16 --rounds 3 --reps 8 --report "$OUT/tune.json" \
    $args > /tmp/tune.log 2>&1
  note "tune $TUNE rc=$? $(grep -E '^tuned in' /tmp/tune.log)"
  grep -v "ThreadSync" /tmp/tune.log | tail -80 >> "$log"
fi
export TILEV4_RECORD_KERNELS=${TILEV4_RECORD_KERNELS:-$OUT/kernels.jsonl}  # what to build here next time
for f in $TESTS; do
  echo "===== $f" >> "$log"
  timeout -s KILL "$TEST_LIMIT" python3 -m pytest -q -n 8 -p no:cacheprovider --tb=short -rfE \
    -o faulthandler_timeout=$((TEST_LIMIT - 20)) "$f" >> "$log" 2>&1
  rc=$?
  note "$f rc=$rc $(tail -1 "$log" | grep -Eo '[0-9]+ (passed|failed|skipped|error)[^=]*' | head -1)"
  section=$(awk -v h="===== $f" '$0 == h { p = 1; next } p' "$log")  # this file's part of the log
  if [ "$rc" -ge 124 ]; then  # killed at its limit: what the progress lines had shown by then
    marks=$(grep -E '^[.FEsx]+ *(\[ *[0-9]+%\])?$' <<< "$section" | tr -cd '.FEsx')
    note "  killed at ${TEST_LIMIT}s after $(tr -cd . <<< "$marks" | wc -c) passed, $(tr -cd FE <<< "$marks" | wc -c) failed"
  fi
  # the short summary's lines of failures and errors (-rfE), with their messages, into the summary too
  grep -E '^(FAILED|ERROR) ' <<< "$section" | cut -c1-400 | sed 's/^/    /' >> "$summary"
done
[ "$BENCHES" = "all" ] && BENCHES=$(python3 -c "import tilev4.bench as b; b._load_all(); print(' '.join(sorted(b.BENCHES)))")
for b in $BENCHES; do
  timeout -s KILL "$BENCH_LIMIT" python3 -m tilev4 bench "$b" --json "/tmp/bench-$b.json" >> "$log" 2>&1
  note "bench $b rc=$?"
done
# one report per benchmark (each with its own same-run peaks), packed into one file: tar -xf bench-json.tar
(cd /tmp && ls bench-*.json >/dev/null 2>&1 && tar -cf "$OUT/bench-json.tar" bench-*.json)
note "done"
