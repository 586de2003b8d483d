#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, in under 10 minutes, what the CPU machines cannot show.
#
#   bash bench/gpu_check.sh [OUT]          (OUT defaults to gpu_check/; PYTHON=... picks another interpreter)
#
# 1. bench/rollout.py on the GPU: our decoding loop against plain `generate`, at GPU batch sizes;
# 2. the default chain (`rlhf run`, configs/default.yaml) in bf16 with sizes raised for the GPU: 8 times the SFT
#    steps and PPO episodes, 4 times the prompts labelled and evaluated;
# 3. PPO sharded (FSDP2, ZeRO-3) on 2 processes against 1 (tests/test_ppo_sharded.py: gloo on the CPU, since one
#    GPU cannot host two NCCL ranks).
# Each part writes its log to OUT; OUT/figures.json gathers the figures (ratios, stage seconds, win rates), to be
# recorded in docs/benchmarks.md. A part that fails is marked failed there and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
PYTHON=${PYTHON:-.venv/bin/python}
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench/gpu_check.sh: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False); nothing run" >&2
    exit 2
fi
mkdir -p "$OUT"
"$PYTHON" -m pipeline.cli models prepare smollm2-135m-instruct > "$OUT/prepare.log" 2>&1
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

rm -f "$OUT/parts.jsonl"
part rollout 120 "$PYTHON" bench/rollout.py --prompts 64 --k 4 --batch 256 --batch-ppo 64 --group 4 --rounds 2
part chain 390 "$PYTHON" -m pipeline.cli run --config configs/default.yaml --run.output_root "$OUT/runs" \
    --run.tracking none --sft.max_steps 32 --preferences.num_prompts 200 --ppo.total_episodes 512 \
    --ppo.batch_size 64 --ppo.num_eval_prompts 128 --eval.num_prompts 192
part fsdp 240 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_ppo_sharded.py
"$PYTHON" bench/gpu_figures.py "$OUT" > "$OUT/figures.json"
cat "$OUT/figures.json"
exit $status
