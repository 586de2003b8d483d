#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, in under 10 minutes, what the CPU machines cannot show.
#
#   bash bench/gpu_check.sh [OUT] [PARTS]   (OUT defaults to gpu_check/; PARTS, comma-separated, to all of
#                                            rollout,chain,fsdp; PYTHON=... picks another interpreter)
#
# 1. bench/rollout.py on the GPU: our decoding loop against plain `generate`, at GPU batch sizes;
# 2. the default chain (`rlhf run`, configs/default.yaml) in bf16 with sizes raised for the GPU: 8 times the SFT
#    steps and PPO episodes, 4 times the prompts labelled and evaluated (a fresh run each time: OUT/runs is
#    removed first, or its stages would be skipped as up to date and their old timings read as new);
# 3. PPO sharded (FSDP2, ZeRO-3) on 2 processes against 1 (tests/test_ppo_sharded.py): on the CPU with gloo, the GPU
#    hidden from it (one GPU cannot host two NCCL ranks, and each rank would ask for a GPU of its own).
# The parts' limits (60 + 100 + 300 + 120 s) add up to under the 10 minutes. Each part writes its log to OUT;
# OUT/figures.json gathers the figures (ratios, stage seconds, win rates), to be recorded in docs/benchmarks.md. A
# part that fails is marked failed there and the others still run; the exit status is 1 then.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
PYTHON=${PYTHON:-.venv/bin/python}
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench/gpu_check.sh: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False); nothing run" >&2
    exit 2
fi
PARTS=",${2:-rollout,chain,fsdp},"
for name in ${PARTS//,/ }; do
    case "$name" in rollout|chain|fsdp) ;; *) echo "bench/gpu_check.sh: no part '$name' (rollout, chain, fsdp)" >&2
                                              exit 2 ;; esac
done
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
status=0

part() {  # part NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local code=$?
    echo "{\"part\": \"$name\", \"exit\": $code, \"seconds\": $((SECONDS - start))}" >> "$OUT/parts.jsonl"
    echo "$name: exit $code in $((SECONDS - start)) s ($OUT/$name.log)"
    [ "$code" = 0 ] || status=1
}

chosen() { [[ "$PARTS" == *",$1,"* ]]; }

rm -f "$OUT/parts.jsonl"
part prepare 60 "$PYTHON" -m pipeline.cli models prepare smollm2-135m-instruct
if chosen rollout; then
    part rollout 100 "$PYTHON" bench/rollout.py --prompts 64 --k 4 --batch 256 --batch-ppo 64 --group 4 --rounds 2
fi
if chosen chain; then
    rm -rf "$OUT/runs"
    part chain 300 "$PYTHON" -m pipeline.cli run --config configs/default.yaml --run.output_root "$OUT/runs" \
        --run.tracking none --sft.max_steps 32 --preferences.num_prompts 200 --ppo.total_episodes 512 \
        --ppo.batch_size 64 --ppo.num_eval_prompts 128 --eval.num_prompts 192
fi
if chosen fsdp; then
    part fsdp 120 env CUDA_VISIBLE_DEVICES= "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_ppo_sharded.py
fi
# written whole or not at all: a figures file from a crashed gathering would read as this run's
if "$PYTHON" bench/gpu_figures.py "$OUT" > "$OUT/figures.json.tmp"; then
    mv "$OUT/figures.json.tmp" "$OUT/figures.json"
    cat "$OUT/figures.json"
else
    echo "bench/gpu_check.sh: gathering the figures failed (bench/gpu_figures.py); the parts' logs are in $OUT" >&2
    status=1
fi
exit $status
