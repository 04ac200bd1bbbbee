#!/usr/bin/env bash
# The GPU suite: on one CUDA GPU, in one command, stage by stage within a wall-clock budget:
#   tests      pytest Testing/tests/test_cuda.py (autocast inference, OOM retry, --device cuda, NCCL/DDP)
#   speed      Testing/benchmarks/benchmark_inference.py on CUDA (network and CLI; fp32/fp16/bf16, batches, compile)
#   paper      covidlesionseg-reproduce --profile paper --split paper, the four models at once on the GPU
#   benchmark  the same on benchmark fold 0 (only where the data holds every slice it needs)
# After each stage, OUT/results.tar.gz is rebuilt with everything so far (laid out as repository paths: extract it in
# the repository root), beside OUT/summary.md and OUT/suite.log: a run cut off at any point returns the stages done.
#
#   Testing/gpu/run_suite.sh [--dry-run] [--carry DIR] [--budget SECONDS] [--stages "tests speed paper benchmark"] OUT
#
# --dry-run: the same stages on the CPU with tiny sizes and steps and synthetic data (seconds to a minute): every line
# runs before a GPU is lent. --carry DIR: the folder Testing/gpu/prepare_carry.py made (data/, site.tar.xz).
# Environment: SUITE_PYTHON (default python3, or .venv/bin/python in a dry run), SUITE_WORK (scratch: runs and
# checkpoints; default /tmp/covidlesionseg-gpu-suite), SUITE_DATA (a png256 data folder when no --carry).
# Testing/gpu/README.md has the plan, the time budget and how to launch it.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DRY=0
CARRY=""
BUDGET=${SUITE_BUDGET_S:-560}
STAGES="tests speed paper benchmark"
while [ $# -gt 1 ]; do
    case "$1" in
        --dry-run) DRY=1; shift ;;
        --carry) CARRY=$(cd "$2" && pwd); shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --stages) STAGES=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[ $# -eq 1 ] || { echo "usage: $0 [--dry-run] [--carry DIR] [--budget SECONDS] [--stages LIST] OUT" >&2; exit 2; }
mkdir -p "$1" && OUT=$(cd "$1" && pwd)
T0=$(date +%s)
WORK=${SUITE_WORK:-/tmp/covidlesionseg-gpu-suite}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
REPORT=$WORK/report
LAST=$REPORT/Testing/gpu/last-run
rm -rf "$REPORT" && mkdir -p "$LAST"
exec > >(tee -a "$LAST/suite.log") 2>&1

if [ $DRY = 1 ]; then
    PY=${SUITE_PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
    DEVICE=cpu
else
    PY=${SUITE_PYTHON:-python3}
    DEVICE=cuda
fi
export PYTHONPATH="$ROOT/COVIDLesionSeg:$ROOT/Training${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
[ $DRY = 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$ROOT"

elapsed() { echo $(( $(date +%s) - T0 )); }
remaining() { echo $(( BUDGET - $(elapsed) )); }
note() { echo "[suite $(elapsed)s] $*"; }

pack() {  # everything so far into OUT (3 files: the device call returns at most 8)
    summary > "$LAST/summary.md"
    tar -czf "$OUT/results.tar.gz.part" -C "$REPORT" . && mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
    cp "$LAST/summary.md" "$OUT/summary.md"
    cp "$LAST/suite.log" "$OUT/suite.log" 2>/dev/null || true
}

summary() {
    echo "# GPU suite run $( [ $DRY = 1 ] && echo '(DRY RUN on the CPU: tiny sizes and steps; no number here means anything)' )"
    echo
    echo "- started $(date -u -d @"$T0" '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET} s, $(elapsed) s so far; device: $DEVICE"
    echo "- $(cat "$LAST/env-short.txt" 2>/dev/null)"
    [ -f "$LAST/mps.txt" ] && sed 's/^/- /' "$LAST/mps.txt"
    echo
    echo "| stage | status | seconds | limit (s) | outputs |"
    echo "|---|---|---|---|---|"
    cat "$LAST/stages.md" 2>/dev/null
}

stage() {  # stage NAME LIMIT_SECONDS OUTPUTS COMMAND...: run under a hard time limit and record the outcome
    local name=$1 limit=$2 outputs=$3 started rc status
    shift 3
    note "stage $name: limit ${limit}s: $*"
    started=$(date +%s)
    timeout --signal=TERM --kill-after=20 "$limit" "$@"
    rc=$?
    case $rc in
        0) status=done ;;
        124|137) status="cut at its time limit (exit $rc)" ;;
        *) status="failed (exit $rc)" ;;
    esac
    echo "| $name | $status | $(( $(date +%s) - started )) | $limit | $outputs |" >> "$LAST/stages.md"
    note "stage $name: $status"
    pack
    return 0
}

skip() {
    echo "| $1 | skipped: $2 | 0 | — | — |" >> "$LAST/stages.md"
    note "stage $1 skipped: $2"
    pack
}

# ---- setup: packages, data, environment record
SITE=$WORK/site
if [ -n "$CARRY" ] && [ -f "$CARRY/site.tar.xz" ] && ! "$PY" -c "import SimpleITK" 2>/dev/null; then
    rm -rf "$SITE" && mkdir -p "$SITE"
    "$PY" - "$CARRY/site.tar.xz" "$SITE" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    try:
        archive.extractall(sys.argv[2], filter="data")
    except TypeError:  # Python before 3.12
        archive.extractall(sys.argv[2])
EOF
    export PYTHONPATH="$SITE:$PYTHONPATH"
fi
if ! "$PY" -c "import SimpleITK" 2>/dev/null; then
    export PYTHONPATH="$PYTHONPATH:$ROOT/Testing/gpu/stub"
    note "SimpleITK missing: using the stand-in (CLI stages skip)"
fi
"$PY" - > "$LAST/env.txt" 2>&1 <<'EOF'
import platform, sys, torch, numpy, SimpleITK
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("numpy", numpy.__version__, "SimpleITK", "stand-in" if getattr(SimpleITK, "STUB", False) else SimpleITK.Version.VersionString())
for index in range(torch.cuda.device_count()):
    properties = torch.cuda.get_device_properties(index)
    print(f"cuda:{index}", properties.name, f"{properties.total_memory / 2**30:.0f} GiB", f"sm_{properties.major}{properties.minor}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi >> "$LAST/env.txt" 2>&1
head -4 "$LAST/env.txt" | tr '\n' ';' > "$LAST/env-short.txt"
cat "$LAST/env.txt"
if [ $DRY = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    note "no CUDA GPU visible: use --dry-run on a CPU"
    skip all "PyTorch sees no CUDA GPU"
    exit 1
fi

DATA=""
if [ -n "$CARRY" ] && [ -f "$CARRY/data/manifest.csv" ]; then
    DATA=$CARRY/data
elif [ -n "${SUITE_DATA:-}" ]; then
    DATA=$SUITE_DATA
elif [ $DRY = 1 ]; then
    DATA=$WORK/synthetic-data
    rm -rf "$DATA" && "$PY" Testing/gpu/make_synthetic_data.py "$DATA" --volumes 20 --slices-per-volume 12 --size 64
elif [ -f "$ROOT/../shared/data/covid19-ct-seg-20cases-png256/manifest.csv" ]; then
    DATA=$ROOT/../shared/data/covid19-ct-seg-20cases-png256
fi
note "data: ${DATA:-none}"
has_split() {  # has_split KIND FOLD: the data holds every slice of that split
    [ -n "$DATA" ] && "$PY" - "$DATA" "$1" "$2" <<'EOF'
import sys
from COVIDLesionSegTraining.splits import SplitSpec, make_split
split = make_split(SplitSpec(sys.argv[2], fold=int(sys.argv[3])), sys.argv[1])
records = split.train + split.val + split.test
sys.exit(0 if all(r.image.is_file() and r.lesion_mask.is_file() for r in records) else 1)
EOF
}
ENCODER=none
for weights in "${CARRY:-/nonexistent}/resnet34-b627a593.pth" "$HOME/.cache/torch/hub/checkpoints/resnet34-b627a593.pth"; do
    [ -f "$weights" ] && ENCODER=$weights && break
done
pack

# ---- stage: CUDA tests
if [[ " $STAGES " == *" tests "* ]]; then
    stage tests 120 "Testing/gpu/last-run/pytest.txt, junit.xml" \
        bash -c "'$PY' -m pytest Testing/tests/test_cuda.py -q -rs -p no:cacheprovider --junitxml='$LAST/junit.xml' 2>&1 | tee '$LAST/pytest.txt'"
fi

# ---- stage: inference speed
if [[ " $STAGES " == *" speed "* ]]; then
    if [ $DRY = 1 ]; then
        SPEED_ARGS=(--tiny --devices cpu --slices 4 --batch-sizes 2 --seconds 1 --time-budget 20)
    else
        SPEED_ARGS=(--devices cuda --slices 300 --network-slices 4000 --batch-sizes 8 32 --precisions fp32 fp16 bf16 --both-formats --compile --seconds 1.5 --time-budget 90)
    fi
    stage speed 120 "Testing/gpu/last-run/speed.md, speed.json" \
        "$PY" Testing/benchmarks/benchmark_inference.py "${SPEED_ARGS[@]}" --markdown "$LAST/speed.md" --json "$LAST/speed.json"
fi

# ---- stages: the paper's protocol for the four models
start_mps() {  # CUDA MPS: the training processes' kernels run side by side instead of time-sliced (SUITE_MPS=0: off)
    if ! command -v nvidia-cuda-mps-control >/dev/null; then
        echo "MPS off: nvidia-cuda-mps-control not found" | tee -a "$LAST/mps.txt"
        return 1
    fi
    export CUDA_MPS_PIPE_DIRECTORY=$WORK/mps-pipe CUDA_MPS_LOG_DIRECTORY=$WORK/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d && timeout 60 "$PY" -c "import torch; assert torch.ones(2, device='cuda').sum().item() == 2"; then
        echo "MPS on for $1" | tee -a "$LAST/mps.txt"
        return 0
    fi
    stop_mps
    echo "MPS off for $1: the daemon did not start or a client could not use it (suite.log)" | tee -a "$LAST/mps.txt"
    return 1
}
stop_mps() {
    echo quit | timeout 15 nvidia-cuda-mps-control
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}

reproduce_stage() {  # reproduce_stage NAME SPLIT_ARGS... : time limit from what is left of the budget
    local name=$1 share=$2 results=$3
    shift 3
    local reserve limit_s minutes gpu_log="" mps=off
    if [ $DRY = 0 ] && [ "${SUITE_MPS:-1}" = 1 ] && start_mps "$name"; then
        mps=on
    fi
    if [ $DRY = 1 ]; then
        reserve=40
        EXTRA=(--device cpu --jobs 2 --max-steps 2 --image-size 64 --widths 4 8 16 32 64)
    else
        reserve=75  # evaluation, Figure 7, packing after the time limit
        EXTRA=(--device cuda --jobs 4 --save-every-seconds 60)
    fi
    limit_s=$(( ($(remaining) - reserve) * share / 100 ))
    if [ "$limit_s" -lt 30 ]; then
        [ $mps = on ] && stop_mps
        skip "$name" "under 30 s of the budget left for training"
        return
    fi
    minutes=$(awk "BEGIN {printf \"%.2f\", $limit_s / 60}")
    if [ $DRY = 0 ] && command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$LAST/$name-gpu-utilization.csv" 2>&1 &
        gpu_log=$!
    fi
    stage "$name" $(( limit_s + reserve )) "Training/results/$results/" \
        "$PY" -m COVIDLesionSegTraining.reproduce --data "$DATA" --profile paper "$@" --encoder-weights "$ENCODER" \
        --runs "$WORK/runs/$name" --output "$REPORT/Training/results/$results" --time-limit-minutes "$minutes" "${EXTRA[@]}"
    [ -n "$gpu_log" ] && kill "$gpu_log" 2>/dev/null
    [ $mps = on ] && stop_mps
    for run in "$WORK/runs/$name"/*/; do  # each run's log and info beside the results (no checkpoints)
        [ -f "$run/log.csv" ] || continue
        mkdir -p "$REPORT/Training/results/$results/training/$(basename "$run")"
        cp "$run/log.csv" "$run/run_info.json" "$REPORT/Training/results/$results/training/$(basename "$run")/"
    done
    pack
}

BENCHMARK=0
if [[ " $STAGES " == *" benchmark "* ]]; then
    has_split benchmark 0 && BENCHMARK=1
fi
if [[ " $STAGES " == *" paper "* ]]; then
    if has_split paper 0; then
        # with the benchmark stage to come, the paper split takes 40 % of what is left, else all of it
        reproduce_stage paper "$( [ $BENCHMARK = 1 ] && echo 40 || echo 100 )" paper-profile-paper-split --split paper
    else
        skip paper "no data with the paper split's slices (${DATA:-no data folder})"
    fi
fi
if [[ " $STAGES " == *" benchmark "* ]]; then
    if [ $BENCHMARK = 1 ]; then
        reproduce_stage benchmark 100 paper-profile-benchmark-fold0 --split benchmark --fold 0
    else
        skip benchmark "the data lacks slices of benchmark fold 0 (the lent GPU machine gets the paper split's slices only: the whole set is 85 MB, over the 64 MiB transfer)"
    fi
fi
note "suite finished in $(elapsed) s"
pack
exit 0
