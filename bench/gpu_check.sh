#!/usr/bin/env bash
# The GPU check: on a CUDA machine with torch and Triton installed (no network needed), install
# this checkout without dependencies, check fastae's direct launch against Triton's launch path
# and run the tests on CUDA (those marked cuda first), then the benchmarks of the targets: the
# reparameterize op at B=4096, k=64..1024 and corrupt on 256 MB against a plain copy (a few
# seconds), then the lean set to JSON (the jacrev gap, then the cases with targets first:
# encode with statistics, the full step, the denoising step, then the rest; B=4096 784->1024
# and B=8192 4096->4096, tf32 and bf16); then, as time allows, the diagnostics: the encoder's
# finishing kernel alone, kernel-level A/B times (bench/kernel_times.py), Triton's launch path
# against the direct one and CUDA-graph steps at 4096 784->1024, and the host time of encode
# with statistics, the full step and the VAE's step at B=64; the ratio table last.
# Everything is written to a scratch folder: tests_launch.log, tests_cuda.log, tests.log,
# warm.log, bench.log, bench.json, bench_*.json, SUMMARY.md, speedup.png, launch/SUMMARY.md,
# graphs/SUMMARY.md, kernel_times.log, finish_times.log. However the run ends, $OUT (default
# ./out) gets all of it as gpu_check.tar.gz plus SUMMARY.md, bench.json, bench.log and
# tests_cuda.log beside it: five files (a device machine returns at most eight), written at
# the end (an EXIT trap) and after the tests and the targets' benchmarks, so a run killed
# outright still returns what its last checkpoint had.
# Run from anywhere:  OUT=/some/folder bash bench/gpu_check.sh
# Where the install fails (a setuptools older than 77 rejects the license field), fastae is
# imported from a linked tree of this checkout instead.
# Before the tests, fastae's direct kernel launch is checked against Triton's own launch path
# on the GPU (tests_launch.log); where they differ, the rest runs with FASTAE_DIRECT_LAUNCH=0.
# Time: the launch check and the tests end at 33% of the budget, the benchmarks of the targets
# at 85%; the diagnostics take what is left (at the default budget rarely any: the lean set
# fills its share; a larger BUDGET_S, or BENCH_ARGS with fewer cases, leaves them time). Every
# timed-out step gets SIGINT first, so pytest stops cleanly and pytest-benchmark still writes
# the JSON of the cases it finished; no step's limit reaches past the budget (the summary and
# the bundle take a few seconds after it).
# Exit status: 1 where a test or benchmark failed (not where one stopped at its time limit),
# there is no CUDA device (unless BENCH_ARGS asks for --fastae-device cpu), fastae does not
# import or no benchmark JSON was written; summarize.py's where it fails; else 0.
# Knobs: PYTHON (default python3); BUDGET_S, the whole run's seconds (default 400); BENCH_ARGS,
# the suite's options (default: the lean CUDA set; bench/warm_cache.py reads the same);
# SKIP_INSTALL=1, SKIP_WARM=1 and SKIP_TESTS=1 leave those steps out.
set -uo pipefail

RESULTS="${OUT:-./out}"
mkdir -p "$RESULTS" && RESULTS="$(cd "$RESULTS" && pwd)"
OUT="$(mktemp -d)/gpu_check" && mkdir "$OUT"
bundle() {
    tar -czf "$RESULTS/gpu_check.tar.gz" -C "$(dirname "$OUT")" gpu_check
    for name in SUMMARY.md bench.json bench.log tests_cuda.log; do
        [ -s "$OUT/$name" ] && cp "$OUT/$name" "$RESULTS/"
    done
    echo "results: $RESULTS (gpu_check.tar.gz holds every file)"
}
trap bundle EXIT
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-400}"
BENCH_ARGS="${BENCH_ARGS:---fastae-device cuda --fastae-sizes lean --fastae-dtypes tf32,bf16}"
start=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - start))); }
# a step's time limit: WANT seconds, but none past the budget (less a SIGINT's grace)
cap() {
    local want=$1 most=$(($(left) - 15))
    [ "$want" -gt "$most" ] && want=$most
    [ "$want" -lt 5 ] && want=5
    echo "$want"
}
until_() { echo $(($1 - $(date +%s))); }  # seconds from now to a deadline
tests_deadline=$((start + BUDGET_S * 33 / 100))
bench_deadline=$((start + BUDGET_S * 85 / 100))
log() { echo "== [$(($(date +%s) - start)) s] $*" | tee -a "$OUT/bench.log"; }
# check_rc RC WHAT LOG: a pytest run's exit status, a failure (listed in failed) unless 0, or
# 124 (stopped at its time limit) where LOG lists no test failed before the stop
failed=()
check_rc() {
    [ "$1" = 0 ] && return 0
    [ "$1" = 124 ] && ! grep -qE "^(FAILED|ERROR) " "$3" && return 0
    failed+=("$2 (exit $1)")
}
: >"$OUT/bench.log"

log "environment"
"$PYTHON" - >>"$OUT/bench.log" 2>&1 <<'EOF'
import platform
import torch
print("python", platform.python_version(), "torch", torch.__version__)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
          "CUDA runtime", torch.version.cuda)
else:
    print("device: no CUDA")
EOF
tail -n 3 "$OUT/bench.log"
if grep -q "^device: no CUDA" "$OUT/bench.log" \
    && ! [[ "$BENCH_ARGS" =~ --fastae-device[=\ ]cpu ]]; then
    log "no CUDA device: nothing to check (BENCH_ARGS with --fastae-device cpu runs on the CPU)"
    exit 1
fi
# The benchmarks profile each case after timing it; the profiler's CUDA tracing (CUPTI) stays
# attached after a profile and slows the launches of the cases after it unless TEARDOWN_CUPTI=1
# detaches it, which crashed beside CUDA graphs before CUDA 12.6: set for the benchmarks where
# the runtime is 12.6 or later, and not for the runs that replay graphs (bench_case); the
# JSONs' machine_info holds the launch cost before the first profile and at the end
# (fastae.benchmark.launch_probe)
teardown=$("$PYTHON" -c "import torch; v = torch.version.cuda
print(int(bool(v) and tuple(map(int, v.split('.')[:2])) >= (12, 6)))" 2>/dev/null || echo 0)

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    log "install (no dependencies)"
    if ! "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/bench.log" 2>&1
    then
        # an older setuptools (before 77) rejects the license field: import from a linked tree
        # laid out as the installed package is (fastae/, with kernels/ as fastae/kernels), and
        # keep the working directory's fastae/ (no kernels/ in it) off sys.path
        tail -n 5 "$OUT/bench.log"
        log "install failed; importing fastae from a linked tree instead"
        tree="$(mktemp -d)"
        mkdir "$tree/fastae"
        ln -s "$PWD"/fastae/* "$tree/fastae/" && ln -s "$PWD/kernels" "$tree/fastae/kernels"
        export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
        "$PYTHON" -c "import fastae.kernels.encoder" >>"$OUT/bench.log" 2>&1 \
            || { log "no importable fastae"; tail -n 20 "$OUT/bench.log"; exit 1; }
    fi
fi

# Compiling dominates a fresh machine's first minutes, one core a compile: fill the Triton and
# inductor caches for the benchmarks in a pool of processes while the tests run (on the same
# GPU; neither is timed). The tests run with FASTAE_AUTOTUNE=0 (one config a kernel: they check
# values, not speed), on several processes where pytest-xdist is installed.
cores=$(nproc 2>/dev/null || echo 4)
warm_pid=
if [ "${SKIP_WARM:-0}" != 1 ]; then
    limit=$(until_ "$tests_deadline")
    [ "$limit" -lt 30 ] && limit=30
    log "warming the compile caches for the benchmarks (in the background, at most $limit s)"
    # shellcheck disable=SC2086
    "$PYTHON" bench/warm_cache.py --workers $(((cores + 1) / 2)) --budget-s "$limit" \
        $BENCH_ARGS >"$OUT/warm.log" 2>&1 &
    warm_pid=$!
fi

# fastae launches its kernels past Triton's launch path (kernels/common.py: launch), checked
# call for call against a stand-in driver only: first compare both paths' training steps bit
# for bit on this GPU, and where they differ, run everything after on Triton's path
tests_rc=skipped
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    limit=$(until_ "$tests_deadline")
    [ "$limit" -gt 120 ] && limit=120
    [ "$limit" -lt 30 ] && limit=30
    log "direct launch against Triton's launch path on this GPU (at most $limit s)"
    FASTAE_AUTOTUNE=0 timeout -s INT -k 20 "$limit" "$PYTHON" -m pytest -q -rfE -m cuda \
        tests/test_launch.py -p no:cacheprovider >"$OUT/tests_launch.log" 2>&1
    launch_rc=$?
    check_rc "$launch_rc" "the launch check" "$OUT/tests_launch.log"
    tail -n 1 "$OUT/tests_launch.log"
    if [ "$launch_rc" = 1 ]; then
        export FASTAE_DIRECT_LAUNCH=0
        log "direct launch FAILED its check (tests_launch.log): FASTAE_DIRECT_LAUNCH=0 from here"
    fi

    parallel=()
    "$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n $((cores / 2 > 1 ? cores / 2 : 1)))
    # after those, the kernels' files first, so a run cut short at the limit has checked the
    # kernels on the GPU; pytest-xdist hands tests out in this order
    first=(encoder_kernel decoder_kernel noise_kernel vae ops reliability autotune properties)
    files=()
    for name in "${first[@]}"; do files+=("tests/test_$name.py"); done
    for file in tests/test_*.py; do
        [[ " ${files[*]} " == *" $file "* ]] || files+=("$file")
    done
    # the tests that only a GPU runs (marked cuda: graphs, half precision, tf32, autocast, fit
    # on the GPU) first, then the rest, kernels first, until the deadline; SIGINT there:
    # pytest stops and still lists the failures so far
    limit=$(until_ "$tests_deadline")
    [ "$limit" -lt 30 ] && limit=30
    log "tests marked cuda (at most $limit s, ${parallel[*]:-one process})"
    FASTAE_AUTOTUNE=0 timeout -s INT -k 30 "$limit" "$PYTHON" -m pytest -q -rfE -m cuda tests \
        -p no:cacheprovider "${parallel[@]}" >"$OUT/tests_cuda.log" 2>&1
    tests_rc=$?
    check_rc "$tests_rc" "the tests marked cuda" "$OUT/tests_cuda.log"
    tail -n 3 "$OUT/tests_cuda.log"
    rest=$(until_ "$tests_deadline")
    if [ "$tests_rc" != 124 ] && [ "$rest" -ge 20 ]; then
        log "the other tests (at most $rest s, kernels first)"
        FASTAE_AUTOTUNE=0 timeout -s INT -k 30 "$rest" "$PYTHON" -m pytest -q -rfE -m "not cuda" \
            "${files[@]}" -p no:cacheprovider "${parallel[@]}" >"$OUT/tests.log" 2>&1
        rc=$?
        check_rc "$rc" "the other tests" "$OUT/tests.log"
        [ "$rc" -gt "$tests_rc" ] && tests_rc=$rc
        tail -n 3 "$OUT/tests.log"
    fi
    [ "$tests_rc" = 124 ] && log "tests stopped at the time limit"
fi
if [ -n "$warm_pid" ]; then
    wait "$warm_pid"
    log "$(tail -n 1 "$OUT/warm.log")"
fi
bundle >/dev/null  # a checkpoint

[ "$teardown" = 1 ] && export TEARDOWN_CUPTI="${TEARDOWN_CUPTI:-1}"
log "benchmarks with TEARDOWN_CUPTI=${TEARDOWN_CUPTI:-unset}"

# bench_case NAME SIZES DTYPES FILE PROVIDERS BUDGET [-k EXPRESSION]: one pytest-benchmark run
# into $OUT/bench_NAME.json, its cases starting within BUDGET s; SIGINT 60 s after that
jsons=()
bench_case() {
    local name=$1 sizes=$2 dtypes=$3 file=$4 providers=$5 budget=$6 cupti=()
    shift 6
    [[ "$providers" == *graph* ]] && cupti=(TEARDOWN_CUPTI=0)
    env "${cupti[@]}" timeout -s INT -k 10 "$(cap $((budget + 60)))" "$PYTHON" -m pytest \
        "bench/test_$file.py" -q -p no:cacheprovider --benchmark-only "$@" --fastae-device cuda --fastae-sizes "$sizes" \
        --fastae-dtypes "$dtypes" --fastae-providers "$providers" --fastae-budget-s "$budget" \
        --benchmark-json "$OUT/bench_$name.json" >>"$OUT/bench.log" 2>&1
    check_rc $? "the benchmarks $name" "$OUT/bench.log"
    [ -s "$OUT/bench_$name.json" ] && jsons+=("$OUT/bench_$name.json")
}

# the two targets that need no compile, first: reparameterize at B=4096, k=64..1024 against
# the eager expression, corrupt on 256 MB against a plain copy (the device's copy bandwidth)
log "benchmarks: reparameterize at B=4096, k=64..1024; corrupt on 256 MB"
bench_case reparameterize_vae vae tf32 ops eager,fastae 25 -k reparameterize
bench_case corrupt_bandwidth bandwidth tf32 ops eager,fastae,floor 15 -k corrupt

budget=$(($(until_ "$bench_deadline") - 20))
[ "$budget" -lt 30 ] && budget=30
log "benchmarks: jacrev gap, steps, ops (cases start within $budget s)"
# (reparameterize at 4096x784x1024 in tf32 left out: the first run above timed eager's and
# fastae's, and compile's here would be compared with them across runs; a -k in BENCH_ARGS
# would replace this one)
timed="4096x784x1024-tf32 and reparameterize"
# shellcheck disable=SC2086
timeout -s INT -k 10 "$(cap $((budget + 90)))" "$PYTHON" -m pytest bench -q -p no:cacheprovider \
    --benchmark-only --benchmark-json "$OUT/bench.json" --fastae-budget-s "$budget" \
    --benchmark-columns=median,mean,stddev,rounds -k "not ($timed)" $BENCH_ARGS \
    >>"$OUT/bench.log" 2>&1
bench_rc=$?
check_rc "$bench_rc" "the benchmarks" "$OUT/bench.log"
grep -E "(passed|failed|skipped|error)" "$OUT/bench.log" | tail -n 1
bundle >/dev/null  # a checkpoint

# Diagnostics, as time allows. The encoder's finishing kernel alone, over the partial sums'
# rows, columns and programs: at 8192x4096->4096 it took 149-285 us of an H200 for 2-8 MB (no
# static explanation found)
if [ "$(left)" -ge 35 ]; then
    log "finishing kernel alone (bench/kernel_times.py --finish, at most 30 s)"
    timeout -s INT -k 5 "$(cap 30)" "$PYTHON" bench/kernel_times.py --finish \
        >"$OUT/finish_times.log" 2>&1
    tail -n 12 "$OUT/finish_times.log"
fi

# kernel-level A/B of choices inside one op: encode with and without statistics, fused and
# split (H = 1000 too: the alignment rule), decode_loss's backward with a per-sample and a
# uniform upstream weight, both backwards with split-K allowed and off and through cuBLAS,
# beside torch.mm; then tf32 at 4096 x 784 -> 1024 (the rules take cuBLAS's weight gradients;
# the benchmark's warm-up compiled its kernels)
if [ "$(left)" -ge 45 ]; then
    log "kernel times (bench/kernel_times.py, at most 90 s + 30 s)"
    timeout -s INT -k 5 "$(cap 90)" "$PYTHON" bench/kernel_times.py \
        --sizes 4096x784x1024,4096x784x1000,8192x4096x4096 \
        --dtype bf16 >"$OUT/kernel_times.log" 2>&1
    [ "$(left)" -ge 45 ] && timeout -s INT -k 5 "$(cap 30)" "$PYTHON" bench/kernel_times.py \
        --sizes 4096x784x1024 --dtype tf32 >>"$OUT/kernel_times.log" 2>&1
    tail -n 56 "$OUT/kernel_times.log"
fi

# Triton's launch path against fastae's direct one at the targets' MNIST-like shape (host-bound
# there), summarized apart (launch/SUMMARY.md), as bench.json has these cases too
if [ "$(left)" -ge 100 ]; then
    log "benchmarks: Triton's launch path against the direct one at 4096x784x1024"
    bench_case launch 4096x784x1024 bf16 ops eager,fastae,fastae_triton_launch 40 \
        -k "encode_stats"
    bench_case launch_steps 4096x784x1024 bf16 steps eager,fastae,fastae_triton_launch 20 \
        -k "all"
    launch_jsons=("$OUT"/bench_launch*.json)
    if [ -s "${launch_jsons[0]}" ]; then
        "$PYTHON" bench/summarize.py "${launch_jsons[@]}" --out "$OUT/launch" \
            >>"$OUT/bench.log" 2>&1
        grep -A 6 "^| case" "$OUT/launch/SUMMARY.md" | head -n 6
    fi
fi

# CUDA graphs at the same shape: fastae's step replayed (GraphedStep) and torch.compile's
# reduce-overhead mode beside eager and fastae, for the full step (graphs/SUMMARY.md)
if [ "$(left)" -ge 110 ]; then
    log "benchmarks: CUDA-graph steps at 4096x784x1024"
    bench_case graphs 4096x784x1024 bf16 steps eager,fastae,fastae_graph,compile_graph 50 \
        -k "all"
    if [ -s "$OUT/bench_graphs.json" ]; then
        "$PYTHON" bench/summarize.py "$OUT/bench_graphs.json" --out "$OUT/graphs" \
            >>"$OUT/bench.log" 2>&1
        grep -A 6 "^| case" "$OUT/graphs/SUMMARY.md" | head -n 6
    fi
fi

# the host time of encode with statistics, of the full step and of the VAE's step at B=64
# (kernels of a few microseconds), also through Triton's own launch path
# (fastae_triton_launch), and the steps replayed from a CUDA graph (fastae_graph: the sklearn
# estimators' batch size)
base=eager,fastae,floor
for spec in "encode_stats ops $base,fastae_triton_launch" \
    "all steps $base,fastae_triton_launch,fastae_graph" \
    "vae steps $base,fastae_graph"; do
    set -- $spec
    [ "$(left)" -lt 50 ] && break
    log "benchmarks: $1 at the host size (B=64)"
    bench_case "$1_host" host bf16 "$2" "$3" $(($(left) - 35)) -k "$1"
done

log "summary (tests exit $tests_rc, benchmarks exit $bench_rc)"
all=()
[ -s "$OUT/bench.json" ] && all+=("$OUT/bench.json")
for json in "${jsons[@]}"; do
    case "$json" in */bench_launch*|*/bench_graphs.json) ;; *) all+=("$json") ;; esac
done
if [ "${#all[@]}" = 0 ]; then
    log "no benchmark JSON was written; see $OUT/bench.log"
    exit 1
fi
[ -s "$OUT/bench.json" ] || log "no bench.json (the lean set); summarizing the others"
"$PYTHON" bench/summarize.py "${all[@]}" --out "$OUT" || exit
if [ "${#failed[@]}" -gt 0 ]; then
    printf -v list '%s; ' "${failed[@]}"
    log "FAILED: ${list%; } (logs in $OUT)"
    exit 1
fi
