#!/usr/bin/env bash
# One prepared check for a GPU machine without network: kernel tests, kernel benchmarks and the
# training-step throughput benchmark, all results in one flat folder, a summary table last.
#
#   bash benchmarks/gpu_check.sh WHEEL_DIR OUT_DIR
#
# WHEEL_DIR holds the wheels the image lacks (shared/wheels/gpu-py312: deepspeed and its needs);
# they go to /tmp/site, put on PYTHONPATH. "-" skips that. The project is installed editable with
# --no-build-isolation (no network for a build environment); if that fails, the repository and the
# kernels folder are put on PYTHONPATH instead.
#
# Time: every stage runs under `timeout`; the limits of the long stages are also cut so that the
# stages after them keep their minimum time before one deadline (GPU_CHECK_BUDGET seconds from the
# start, default 450), so the whole script ends within 8 minutes on an H100 whatever hangs (each
# kill adds at most 5 s, counted in). A failing or timed-out stage does not stop the others.
#
#   stage             limit  min  what
#   install              60   60  wheels into /tmp/site, `pip install -e .`
#   info                 20   20  nvidia-smi, versions
#   kernel-tests        150   60  pytest -m gpu tests/kernels
#   kernel-bench        120   45  benchmarks/fused_ops.py --out --profile (when the file exists)
#   throughput          200  150  base, micro-batch 64, bf16: sdpa/eager/triton x single/two/alternate,
#                                 VisualBERT + LXMERT, padding study on triton (its "packed" rows run
#                                 the Triton varlen kernel, as --packed_text training would), largest
#                                 micro-batch + its runs
#   throughput-compile  110   45  the same main grid under torch.compile with CUDA graphs
#                                 (mode reduce-overhead; sdpa, triton, then eager as time allows):
#                                 how much of eager's step is launch overhead (compare the kernel
#                                 busy % columns)
#   throughput-fp16      60   25  the main grid in fp16 (sdpa, then triton: its fp16 autotuning last)
#   model-kernels        60    0  tests/test_model_kernels.py on the GPU, and the loader test of workers
#                                 reusing their buffers (here with pinned memory), only with time left
#   pretrain            180    0  the main job, only with time left: launch/pretrain.py, one process,
#                                 base preset, bf16 (ds_configs/h100.json at micro-batch 64, with
#                                 torch's AdamW instead of DeepSpeed's JIT-built FusedAdam), the toy
#                                 world (4 loader workers, 0 if /dev/shm has under 1 GB free),
#                                 30 steps with kernel_backend auto, 30 with auto and DeepSpeed's
#                                 bf16 overflow check on (its default, which h100.json turns off), 30
#                                 with triton, then 30 with auto and --compile; each profiles its steps
#                                 11-13 (--profile_steps: the GPU's busy share of the real step)
#   summary              15   10  benchmarks/report.py over the JSON files, stage table
# Worst case (every stage uses its whole limit): 450 s. Typical: install ~20 s, and the throughput
# stage gets its full 200 s when the kernel tests take about a minute. With a smaller budget the
# lowest-priority stages (model-kernels, fp16, compile) shrink or are skipped first.
#
# OUT_DIR stays flat and small (the device tool brings back at most 8 files): gpu_check.log (all
# output), throughput.json, throughput_compile.json, throughput_fp16.json, pretrain_metrics.jsonl,
# and the kernel benchmark's files (tarred into kernels.tar.gz if there are more than two).
#
# Environment: PYTHON (default python3); GPU_CHECK_BUDGET (seconds, default 450); SEMVLP_GIT_COMMIT
# (the commit to stamp results with, when the copied tree's git cannot say); GPU_CHECK_STAGES (a
# comma list: run only these stages besides install, info and summary, e.g. "pretrain" for a second
# call on a still-warm machine); GPU_CHECK_CPU=1 shrinks everything to a CPU smoke run (tiny
# preset, no compile) to test this script.
set -u

if [ $# -ne 2 ]; then
    echo "usage: bash benchmarks/gpu_check.sh WHEEL_DIR|- OUT_DIR" >&2
    exit 2
fi
WHEEL_DIR=$1
OUT=$(mkdir -p "$2" && cd "$2" && pwd) || { echo "cannot create $2" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
CPU_MODE=${GPU_CHECK_CPU:-0}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

STAGES=(install info kernel-tests kernel-bench throughput throughput-compile throughput-fp16 model-kernels pretrain
    summary)
declare -A LIMIT=([install]=60 [info]=20 [kernel-tests]=150 [kernel-bench]=120 [throughput]=200
    [throughput-compile]=110 [throughput-fp16]=60 [model-kernels]=60 [pretrain]=180 [summary]=15)
declare -A MIN=([install]=60 [info]=20 [kernel-tests]=60 [kernel-bench]=45 [throughput]=150
    [throughput-compile]=45 [throughput-fp16]=25 [model-kernels]=0 [pretrain]=0 [summary]=10)
SELECTED=${GPU_CHECK_STAGES:-}
declare -A RESULT=()
KILL_GRACE=5

# Seconds stage $1 may run. install, info and summary always get their own (short) limits; every
# other stage's limit is cut so that the stages after it keep their minimum (scaled down when
# GPU_CHECK_BUDGET is under 450 s) and the summary still fits before the budget ends.
stage_limit() {
    local name=$1 reserve=0 later=0 s
    local limit=${LIMIT[$name]}
    case $name in install | info | summary) echo "$limit"; return ;; esac
    for s in "${STAGES[@]}"; do
        if [ "$later" = 1 ] && [ "$s" != summary ]; then reserve=$((reserve + MIN[$s])); fi
        if [ "$s" = "$name" ]; then later=1; fi
    done
    if [ "$BUDGET" -lt 450 ]; then reserve=$((reserve * BUDGET / 450)); fi
    local left=$((BUDGET - SECONDS - reserve - LIMIT[summary] - 2 * KILL_GRACE))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    echo "$limit"
}

# run_stage NAME COMMAND...: run under the stage's time limit; record ok / failed (rc) / timeout / skipped.
run_stage() {
    local name=$1
    shift
    if [ -n "$SELECTED" ] && [[ ! "$name" =~ ^(install|info|summary)$ ]] && [[ ",$SELECTED," != *",$name,"* ]]; then
        skip_stage "$name" "not in GPU_CHECK_STAGES"
        return
    fi
    local limit
    limit=$(stage_limit "$name")
    echo
    echo "=== [$name] limit ${limit}s (elapsed ${SECONDS}s of ${BUDGET}s): $*"
    if [ "$limit" -lt 10 ]; then
        RESULT[$name]="skipped (no time left)"
        echo "=== [$name] skipped: no time left"
        return
    fi
    local start=$SECONDS rc cmd=("$@")
    if [ "$(type -t "$1")" = function ]; then
        # timeout runs programs, not shell functions: hand the function and its variables to a child bash.
        cmd=(bash -c "$(declare -f "$1"); $(declare -p PY WHEEL_DIR REPO WORK OUT SIZE CPU_MODE); \"\$@\"" _ "$@")
    fi
    STAGE_LIMIT=$limit timeout -k "$KILL_GRACE" "$limit" "${cmd[@]}"
    rc=$?
    local took=$((SECONDS - start))
    case $rc in
        0) RESULT[$name]="ok (${took}s)" ;;
        124 | 137) RESULT[$name]="TIMEOUT after ${took}s (limit ${limit}s)" ;;
        *) RESULT[$name]="FAILED rc=$rc (${took}s)" ;;
    esac
    echo "=== [$name] ${RESULT[$name]}"
}

skip_stage() {
    RESULT[$1]="skipped ($2)"
    echo
    echo "=== [$1] skipped: $2"
}

# ---------------------------------------------------------------- stages

install() {
    if [ "$WHEEL_DIR" != "-" ]; then
        if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEEL_DIR"/*.whl ||
                echo "wheel install failed (deepspeed is not needed by these checks)"
        else
            echo "no wheels in $WHEEL_DIR"
        fi
    fi
    if [ "$CPU_MODE" = 1 ]; then
        echo "cpu mode: not reinstalling the project (it is already installed in this environment)"
    else
        "$PY" -m pip install -q --no-deps --no-build-isolation -e .
    fi
}

info() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    else
        echo "no nvidia-smi"
    fi
    echo "cpus $(nproc); /dev/shm (the loader workers' batches): $(df -Ph /dev/shm | awk 'NR == 2 {print $2 " total, " $4 " free"}')"
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for name in ("triton", "transformers", "deepspeed", "h5py", "nvidia-ml-py", "semvlp"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
EOF
}

kernel_bench() {
    # The full run took ~40 s on an H100 before device_ms (+ a profiled burst per row, seconds in all)
    # and before the attention had 12 backward configs to compile and tune per shape (not timed on a
    # GPU yet); --quick ~30 s, for a cut limit. The memory-bound ops run first, so a run cut at the
    # limit keeps them (fused_ops.py rewrites its JSON after every case).
    # --profile adds a torch.profiler table per case (where each fused op's host time goes).
    local quick=()
    if [ "$STAGE_LIMIT" -lt 75 ]; then quick=(--quick); fi
    "$PY" benchmarks/fused_ops.py --out "$WORK/kernels" --profile "${quick[@]}"
}

# Outside the timed stage, so that a stage killed at its limit still hands over what fused_ops.py
# saved (it rewrites its JSON after every case).
collect_kernel_results() {
    local files=()
    mapfile -t files < <(find "$WORK/kernels" -type f 2>/dev/null | sort)
    if [ "${#files[@]}" -gt 2 ]; then
        tar -czf "$OUT/kernels.tar.gz" -C "$WORK/kernels" . && echo "kernel results: ${#files[@]} files -> kernels.tar.gz"
    elif [ "${#files[@]}" -gt 0 ]; then
        cp "${files[@]}" "$OUT/" && echo "kernel results: ${files[*]##*/}"
    fi
}

# throughput NAME ARGS...: the benchmark with an internal budget a little under the stage limit,
# so it stops between runs and keeps its JSON (written after every run) even if killed.
throughput() {
    local out=$1
    shift
    local budget=$((STAGE_LIMIT - 25))
    if [ "$budget" -lt $((STAGE_LIMIT * 3 / 4)) ]; then budget=$((STAGE_LIMIT * 3 / 4)); fi
    "$PY" benchmarks/throughput.py "${SIZE[@]}" --out "$OUT/$out" --time-budget "$budget" "$@"
}

if [ "$CPU_MODE" = 1 ]; then
    SIZE=(--preset tiny --batch-size 2 --warmup 1 --steps 2 --repeats 1 --max-batch-cap 8 --device cpu)
    PRECISIONS=(fp32 bf16)
else
    # Fewer timed steps than the defaults (5 warm-up, 5 x 10): each run is then ~1 s after warm-up.
    SIZE=(--preset base --batch-size 64 --warmup 3 --steps 8 --repeats 3 --device cuda)
    PRECISIONS=(bf16 fp16)
fi

echo "gpu_check: repo $REPO, out $OUT, python $PY, budget ${BUDGET}s, cpu mode $CPU_MODE, $(date -u +%FT%TZ)"
# The commit the results are stamped with: SEMVLP_GIT_COMMIT if the caller set it (a copied tree
# may carry no usable .git), else HEAD when git gives a real hash.
if [ -z "${SEMVLP_GIT_COMMIT:-}" ]; then
    SEMVLP_GIT_COMMIT=$(git -C "$REPO" rev-parse --verify -q HEAD 2>/dev/null | head -n 1)
    [[ "$SEMVLP_GIT_COMMIT" =~ ^[0-9a-f]{40}$ ]] || SEMVLP_GIT_COMMIT=unknown
fi
export SEMVLP_GIT_COMMIT
echo "commit: $SEMVLP_GIT_COMMIT"
if [ "$SEMVLP_GIT_COMMIT" = unknown ]; then
    echo "WARNING: no git commit here (a copied tree?): every result will say 'unknown'; run with" \
        "SEMVLP_GIT_COMMIT=<the commit of this tree> to stamp them"
fi
run_stage install install
if [ "$WHEEL_DIR" != "-" ] && [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
IMPORT_CHECK="import semvlp, semvlp_kernels.dispatch; print('semvlp from', semvlp.__file__)"
if ! "$PY" -c "$IMPORT_CHECK"; then
    echo "the project does not import after the install: falling back to PYTHONPATH (repo + semvlp_kernels link)"
    mkdir -p "$WORK/path" && ln -sfn "$REPO/kernels" "$WORK/path/semvlp_kernels"
    export PYTHONPATH=$WORK/path:$REPO${PYTHONPATH:+:$PYTHONPATH}
    "$PY" -c "$IMPORT_CHECK" || echo "the project still does not import: later stages will fail"
fi
run_stage info info

if [ -d tests/kernels ]; then
    run_stage kernel-tests "$PY" -m pytest -m gpu tests/kernels -q -p no:cacheprovider
else
    skip_stage kernel-tests "no tests/kernels"
fi

if [ -f benchmarks/fused_ops.py ]; then
    run_stage kernel-bench kernel_bench
    collect_kernel_results
else
    skip_stage kernel-bench "no benchmarks/fused_ops.py yet"
fi

# Backend order: the first backend's grid runs before the peers, and a CUDA error in one backend
# ends the process (later runs are recorded as skipped): the newest code (triton) goes last.
# The padding study runs on triton, not on the fastest backend, so that "packed" is timed with the
# Triton varlen kernel against triton's padded layouts (the same number of runs; triton's autotuning
# per text length lengthens their warm-up, and the max-batch search after it is what a tight
# internal budget cuts first). The main grid's full-text rows relate triton to sdpa.
run_stage throughput throughput throughput.json --precision "${PRECISIONS[0]}" \
    --backends sdpa,eager,triton --modes single,two,alternate --peers --padding-study --padding-backend triton \
    --find-max-batch

if [ "$CPU_MODE" = 1 ]; then
    skip_stage throughput-compile "cpu mode"
else
    run_stage throughput-compile throughput throughput_compile.json --precision "${PRECISIONS[0]}" \
        --backends sdpa,triton,eager --modes single,two,alternate --compile on --compile-mode reduce-overhead
fi

run_stage throughput-fp16 throughput throughput_fp16.json --precision "${PRECISIONS[1]}" \
    --backends sdpa,triton --modes single,two,alternate

if [ -f tests/test_model_kernels.py ] && [ "$CPU_MODE" != 1 ]; then
    run_stage model-kernels "$PY" -m pytest tests/test_model_kernels.py -q -p no:cacheprovider \
        "tests/test_data_pretrain.py::test_workers_that_reuse_their_buffers_give_the_batches_of_fresh_memory"
else
    skip_stage model-kernels "cpu mode or no tests/test_model_kernels.py"
fi

# The main job as a user runs it, minus the launcher: launch/pretrain.py as one DeepSpeed process on
# the toy world, with the default kernel backend, again with DeepSpeed's bf16 overflow check on (its
# default, which the shipped configs turn off: benchmarks/step_ops.py counts ~3,000 operators a step),
# with every Triton kernel, then compiled. A variant is BACKEND[-compile|-overflowcheck].
pretrain() {
    "$PY" -m semvlp.data.toy --out "$WORK/toy" >/dev/null || return 1
    local config=$WORK/pretrain_ds.json preset=base steps=30 variants=(auto auto-overflowcheck triton auto-compile)
    local variant rc=0
    local profile=(--profile_steps 3)  # steps 11-13: compiled and tuned by then, and out of the last log window
    # The toy store is gzip-compressed (~0.4 ms an image to decode; real stores are not), so 4 workers
    # keep 64-sample steps fed. Each keeps 3 batches in /dev/shm (~80 MB); a container's default
    # 64 MB would kill them, so with under 1 GB free the batches are built in the training process.
    local workers=4 shm_free_mb
    shm_free_mb=$(df -Pm /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
    if [ -z "$shm_free_mb" ] || [ "$shm_free_mb" -lt 1024 ]; then
        workers=0
    fi
    # On a CPU the Triton kernels would run in Triton's interpreter, far too slow for training steps
    # (tests/test_model_kernels.py covers that model there).
    if [ "$CPU_MODE" = 1 ]; then
        preset=tiny steps=4 variants=(auto auto-overflowcheck) profile=(--profile_warmup 2 --profile_steps 1) workers=1
    fi
    "$PY" - "$CPU_MODE" "$config" <<'EOF' || return 1
import json, sys

cpu_mode, out = sys.argv[1] == "1", sys.argv[2]
config = json.load(open("ds_configs/cpu.json" if cpu_mode else "ds_configs/h100.json"))
config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
config["optimizer"]["params"]["torch_adam"] = True  # DeepSpeed's FusedAdam would be JIT-built first
json.dump(config, open(out, "w"))
if "bf16" in config:  # (fp32, the CPU smoke run's, has no overflow check: the same config)
    config["bf16"]["check_grad_overflow"] = True
json.dump(config, open(out.replace(".json", "_overflowcheck.json"), "w"))
print(f"one process, micro-batch {config['train_micro_batch_size_per_gpu']}, config {out}")
EOF
    for variant in "${variants[@]}"; do
        local backend=${variant%%-*} compile=() compiled=false ds_config=$config checked=false
        case $variant in
            *-compile) compile=(--compile) compiled=true ;;
            *-overflowcheck) ds_config=${config%.json}_overflowcheck.json checked=true ;;
        esac
        echo "--- pretrain: kernel_backend $backend ${compile[*]}, $preset preset, $steps steps, loader workers: $workers, $ds_config"
        "$PY" launch/pretrain.py --deepspeed_config "$ds_config" --preset "$preset" --data "$WORK/toy/data.json" \
            --output_dir "$WORK/pretrain_$variant" --kernel_backend "$backend" --max_steps "$steps" \
            --log_every 10 --eval_every "$steps" --eval_batches 2 --num_workers "$workers" "${profile[@]}" "${compile[@]}" || rc=1
        if [ -f "$WORK/pretrain_$variant/metrics.jsonl" ]; then
            local prefix="\"kernel_backend\": \"$backend\", \"compile\": $compiled, \"overflow_check\": $checked"
            "$PY" - "$WORK/pretrain_$variant/versions.json" "{$prefix}" >>"$OUT/pretrain_metrics.jsonl" <<'EOF'
import datetime, json, os, sys

versions = json.load(open(sys.argv[1]))
now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
print(json.dumps({**json.loads(sys.argv[2]), "kind": "run", **versions,
                  "git_commit": os.environ.get("SEMVLP_GIT_COMMIT", "unknown"), "date": now}))
EOF
            sed "s/^{/{$prefix, /" "$WORK/pretrain_$variant/metrics.jsonl" >>"$OUT/pretrain_metrics.jsonl"
        fi
    done
    return $rc
}
run_stage pretrain pretrain

summary() {
    local files=()
    mapfile -t files < <(ls "$OUT"/throughput*.json 2>/dev/null)
    if [ "${#files[@]}" -gt 0 ]; then
        "$PY" benchmarks/report.py --detail "${files[@]}"
    else
        echo "no throughput results"
    fi
    if [ -f "$OUT/pretrain_metrics.jsonl" ]; then
        echo
        "$PY" benchmarks/report.py --pretrain "$OUT/pretrain_metrics.jsonl"
    fi
}
# The summary prints last: the per-file detail, then the pooled table, then the stage table.
run_stage summary summary

# Keep OUT_DIR flat and within 8 files (the device tool's limit): fold any extras into one tarball.
mapfile -t extra < <(find "$OUT" -mindepth 1 -maxdepth 1 ! -name gpu_check.log ! -name 'throughput*.json' | sort)
if [ "$(find "$OUT" -mindepth 1 | wc -l)" -gt 8 ] || find "$OUT" -mindepth 2 | grep -q .; then
    tar -czf "$WORK/extra.tar.gz" -C "$OUT" "${extra[@]##*/}" && rm -rf "${extra[@]}" && mv "$WORK/extra.tar.gz" "$OUT/"
fi
rm -rf "$WORK"

echo
echo "| stage | result |"
echo "|---|---|"
for s in "${STAGES[@]}"; do echo "| $s | ${RESULT[$s]:-not run} |"; done
echo "gpu_check: done in ${SECONDS}s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null || sleep 1  # let tee finish the log file
