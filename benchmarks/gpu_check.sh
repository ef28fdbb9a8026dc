#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md in one script, inside 10 minutes on one GPU:
#
#   1. swin_t training throughput (spots/s, bf16 autocast, channels-last) from the HDF5
#      patch cache against in-memory tensors (benchmarks/train.py), peak GPU memory;
#   2. the same with torch.compile;
#   3. embedding throughput of four presets at full size with --batch-size auto (the batch
#      sized to the free GPU memory; benchmarks/embed.py), patches/s and peak memory;
#   4. a short her2st-gpu fold (config/her2st.yaml + config/her2st_gpu.yaml: Swin-T at
#      224 px; one method, one fold, a few epochs) to its metrics file.
#
# Every step has its own time limit and writes its numbers (JSON/TSV + a log) to OUT;
# OUT/summary.tsv lists each step's exit status and seconds, so a step that fails or runs
# out of time does not hide the others.
#
#   bash benchmarks/gpu_check.sh [OUT]              # on a GPU machine (default OUT:
#                                                   # benchmarks/out/gpu_check)
#   bash benchmarks/gpu_check.sh --tiny [OUT]       # CPU: cpu_small, tiny sizes, no
#                                                   # compile, the fold as a dry run
#   bash benchmarks/gpu_check.sh --dry-run [OUT]    # print and record the commands only
#
# Environment: PYTHON (default .venv/bin/python, else python3), HER2ST (the her2st data,
# default ../shared/data/her2st), SPOTS, STEPS, BATCH, WORKERS, EPOCHS (sizes of the runs).
set -euo pipefail

usage() {
    echo "usage: bash benchmarks/gpu_check.sh [--tiny | --dry-run] [OUT]" >&2
    exit 2
}

mode=gpu
out=""
for arg in "$@"; do
    case "$arg" in
        --tiny) mode=tiny ;;
        --dry-run) mode=dry ;;
        -h | --help) usage ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; usage ;;
        *) [[ -z "$out" ]] || usage; out="$arg" ;;
    esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${out:-$repo/benchmarks/out/gpu_check}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
[[ "$PYTHON" == */* ]] && export PATH="$(cd "$(dirname "$PYTHON")" && pwd):$PATH"  # `stevs` CLI
her2st="${HER2ST:-$repo/../shared/data/her2st}"

if [[ "$mode" == tiny ]]; then
    preset=cpu_small device=cpu
    spots="${SPOTS:-64}" steps="${STEPS:-1}" batch="${BATCH:-16}" workers="${WORKERS:-0}"
    epochs="${EPOCHS:-1}" train_limit=300 fold_limit=120
    embed=(--scale tiny --device cpu --patches 16 --presets uni) embed_limit=120
else
    preset=swin_t device=cuda
    spots="${SPOTS:-4096}" steps="${STEPS:-60}" batch="${BATCH:-64}" workers="${WORKERS:-6}"
    epochs="${EPOCHS:-2}" train_limit=150 fold_limit=270
    embed=(--scale full --device cuda --patches 2048 --workers "$workers"
        --presets effnet_lite0_in1k uni virchow2 hoptimus0) embed_limit=120
fi

train=("$PYTHON" "$repo/benchmarks/train.py" --preset "$preset" --device "$device"
    --spots "$spots" --steps "$steps" --warmup 3 --batch-size "$batch" --workers "$workers"
    --channels-last)
fold_results="$out/her2st_gpu"
# the short fold's own settings as a config file (Snakemake's --config reads nested values
# as text: training={epochs: 2} fails the schema with '2' is not an integer)
overlay="$out/her2st_fold0.yaml"
printf 'training:\n  epochs: %s\nmethods: [stevs]\n' "$epochs" >"$overlay"
fold=("$PYTHON" -m snakemake --cores all --directory "$repo"
    --configfile "$repo/config/her2st.yaml" "$repo/config/her2st_gpu.yaml" "$overlay"
    --config "data_root=$her2st" "results=$fold_results" --
    "$fold_results/metrics/swin_t/stevs/seed0/fold0.tsv")
[[ "$mode" == tiny ]] && fold=("${fold[@]:0:3}" -n "${fold[@]:3}")

printf 'step\texit\tseconds\tcommand\n' >"$out/summary.tsv"
: >"$out/commands.txt"

# run NAME LIMIT_S COMMAND...: time-limited, output to OUT/NAME.log, a row of summary.tsv
run() {
    local name=$1 limit=$2
    shift 2
    printf '%s\t%s\n' "$name" "$*" >>"$out/commands.txt"
    if [[ "$mode" == dry ]]; then
        echo "[dry-run] $name (limit ${limit}s): $*"
        return 0
    fi
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS status=0
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1 || status=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$*" >>"$out/summary.tsv"
    tail -n 3 "$out/$name.log"
}

if [[ "$mode" == gpu ]]; then
    if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check.sh: no CUDA device visible to $PYTHON (use --tiny on CPU)" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.csv" || true
fi

run train_channels_last "$train_limit" "${train[@]}" --json "$out/train_channels_last.json"
if [[ "$mode" == tiny ]]; then
    echo "(tiny mode: torch.compile is not run on CPU; its step is listed in commands.txt)"
    printf '%s\t%s\n' train_compile "${train[*]} --compile" >>"$out/commands.txt"
else
    run train_compile "$train_limit" "${train[@]}" --compile --json "$out/train_compile.json"
fi
run embed_auto_batch "$embed_limit" "$PYTHON" "$repo/benchmarks/embed.py" "${embed[@]}" \
    --batch-size auto --json "$out/embed_auto_batch.json"
run her2st_fold0 "$fold_limit" "${fold[@]}"
echo "numbers in $out (summary.tsv, train_*.json, embed_auto_batch.json, her2st_gpu/metrics/)"
