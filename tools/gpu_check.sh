#!/usr/bin/env bash
# The one-shot GPU check (README "Speed"): on a fresh single-GPU machine with torch and no internet,
#   tools/gpu_check.sh [WHEELS_DIR]          (default: wheels/, downloaded as README says)
# installs what is missing from the wheels folder, then prints one table per stage:
#   (c) a few TP=1 training steps on the GPU against the CPU (tools/check_gpu_equality.py)
#   (b) the memory planner against torch.cuda.max_memory_allocated, B/16 and L/14 (tools/check_planner.py)
#   (a) open_clip vs megaclip, B/16 batch 256, L/14 batch 128, g/14 batch 32, compile off and on
#       (tools/benchmark.py --vs-open-clip)
# Each stage has its own time limit (together under 8 minutes) and prints its rows as it goes, so a
# stage that runs out still shows what it measured. Without a GPU every stage says so in one line and
# runs its CPU smoke version instead (tiny configs, fp32), which is what CI runs.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
WHEELS=${1:-wheels}

stage() {  # title, limit in seconds, command...
    local title=$1 limit=$2 rc
    shift 2
    echo
    echo "== $title (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "$title: stopped at its ${limit}s limit (rows above are complete)"
    elif [ "$rc" -ne 0 ]; then
        echo "$title: FAILED (exit $rc)"
    fi
}

install() {
    # torchvision must match the machine's torch: only installed (without dependencies) when missing
    $PY -c "import torchvision" 2>/dev/null ||
        $PY -m pip install -q --no-index --find-links "$WHEELS" --no-deps torchvision || return
    $PY -m pip install -q --no-index --find-links "$WHEELS" megatron-core==0.16.1 omegaconf webdataset braceexpand \
        open_clip_torch ftfy wcwidth regex sentencepiece
}

gpu=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null)
echo "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC') | GPU: ${gpu:-none} | $($PY -c 'import sys, torch; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) | Python {sys.version.split()[0]}")')"
if [ -d "$WHEELS" ]; then
    stage "install from $WHEELS/" 30 install
else
    echo "== install: skipped, no $WHEELS/ here (what is installed is used)"
fi

if [ -n "$gpu" ]; then
    stage "(c) GPU vs CPU training steps" 60 $PY tools/check_gpu_equality.py --config-name clip_B32 --layers 2 --steps 5 --batch 16
    stage "(b) memory planner vs allocator" 45 $PY tools/check_planner.py --case clip_B16:256 --case clip_L14:128 --steps 2
    bench="$PY tools/benchmark.py --vs-open-clip --repeats 3 --steps 5 --warmup 3 --compiled-open-clip amp_bf16"
    stage "(a) open_clip vs megaclip, ViT-B-16 batch 256" 80 $bench --model ViT-B-16 --batch 256
    stage "(a) open_clip vs megaclip, ViT-L-14 batch 128" 100 $bench --model ViT-L-14 --batch 128
    stage "(a) open_clip vs megaclip, ViT-g-14 batch 32" 140 $bench --model ViT-g-14 --batch 32
else
    echo "no GPU: each stage below runs its CPU smoke version (tiny config, fp32, compile off)"
    stage "(c) training steps: no GPU, CPU bf16 O2 vs CPU fp32" 120 \
        $PY tools/check_gpu_equality.py --config-name clip_tiny --steps 2 --batch 8
    stage "(b) memory planner: no GPU, no allocator to compare with" 60 $PY tools/check_planner.py --case clip_tiny:8 --steps 1
    stage "(a) open_clip vs megaclip: no GPU, tiny fp32" 60 \
        $PY tools/benchmark.py --vs-open-clip --model tiny --batch 8 --compile off --repeats 1 --steps 1 --warmup 1
fi
