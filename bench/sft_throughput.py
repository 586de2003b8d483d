"""SFT throughput: our SFT stage against a plain PyTorch training loop on the same examples, batch size, maximum
length and precision (the stage's `auto`: bf16 mixed precision where the hardware has native bf16, else fp32),
alternating in one call; then TRL's SFTTrainer with its defaults (bf16=True) and with bf16 off,
through bench/trl_baselines.py.

    python bench/sft_throughput.py [--model smollm2-135m-instruct] [--rounds 2] [--steps 6] [--batch 4] [--seq 256]

Prints `name: value` lines: trained real (non-padding) tokens/s for each, and last `ratio: X` = ours / plain loop.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from rlhf import hardware, models  # noqa: E402
from rlhf.config import RunConfig, load_config  # noqa: E402
from rlhf.datasets import load_rows  # noqa: E402
from sft.config import SFTStageConfig  # noqa: E402
from sft.train import main as sft_main, tokenize_rows  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
YARDSTICK = REPO / "bench" / "trl_baselines.py"
DATA = "data/sft_demonstrations.jsonl"


def ours(a, out: Path) -> float:
    overrides = [f"--run.output_root={out}", "--run.name=bench", "--run.tracking=none", f"--sft.model={a.model}",
                 f"--sft.train_data={DATA}", "--sft.eval_fraction=0", "--sft.num_samples=0",
                 f"--sft.max_steps={a.steps}", f"--sft.per_device_train_batch_size={a.batch}",
                 f"--sft.max_length={a.seq}", "--sft.save_strategy=no", "--sft.logging_steps=1000",
                 "--sft.learning_rate=1e-5", "--sft.disable_tqdm=true"]
    sections = load_config(REPO / "configs/default.yaml", overrides, {"run": RunConfig, "sft": SFTStageConfig})
    return sft_main(sections["sft"], sections["run"])["real_tokens_per_s"]


def plain_loop(a, examples: list[list[int]], pad_id: int, bf16: bool) -> float:
    """AdamW on fp32 weights (forward and loss under a bf16 autocast with `bf16`, as the stage's mixed precision),
    batches of `batch` examples padded to the longest, loss on every real token."""
    model = models.load_causal_lm(a.model)[0].train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rng = random.Random(0)
    order = [ids for _ in range(a.steps * a.batch // len(examples) + 1) for ids in rng.sample(examples, len(examples))]
    tokens, started = 0, time.perf_counter()
    for step in range(a.steps):
        batch = order[step * a.batch:(step + 1) * a.batch]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, :len(ids)], mask[i, :len(ids)] = torch.tensor(ids), 1
        labels = input_ids.masked_fill(mask == 0, -100)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(mask.sum())
    return tokens / (time.perf_counter() - started)


def trl_yardstick(a, model_dir: str, bf16: bool) -> dict:
    command = [sys.executable, str(YARDSTICK), "sft", "--model", model_dir, "--steps", str(a.yardstick_steps),
               "--batch", str(a.batch), "--seq", str(a.seq)] + (["--bf16"] if bf16 else [])
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours and the plain loop")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--yardstick_steps", type=int, default=3, help="TRL steps (the first is warm-up)")
    p.add_argument("--skip_trl", action="store_true", help="skip the TRL yardstick runs (bf16 takes minutes)")
    a = p.parse_args()

    model_dir = models.resolve(a.model)
    tokenizer = models.load_tokenizer(model_dir)
    encoded = tokenize_rows(load_rows(DATA, "sft"), tokenizer, assistant_only=True)
    examples = [ids[:a.seq] for ids in encoded["input_ids"]]
    bf16 = hardware.choose("auto").bf16  # what the stage's precision: auto picks here
    print(f"model: {a.model}\nthreads: {torch.get_num_threads()}\nbatch: {a.batch}\nmax_length: {a.seq}\n"
          f"steps: {a.steps}\nmean_example_tokens: {statistics.mean(map(len, examples)):.1f}\n"
          f"precision (both sides): {'bf16 mixed' if bf16 else 'fp32'}")
    ours_rates, plain_rates = [], []
    with tempfile.TemporaryDirectory() as out:
        for round_index in range(a.rounds):
            ours_rates.append(ours(a, Path(out)))
            plain_rates.append(plain_loop(a, examples, tokenizer.pad_token_id, bf16))
            print(f"round_{round_index}: ours {ours_rates[-1]:.1f} tokens/s, plain {plain_rates[-1]:.1f} tokens/s",
                  flush=True)
    if not a.skip_trl:
        for bf16 in (False, True):
            result = trl_yardstick(a, model_dir, bf16)
            print(f"trl_sft_bf16_{str(bf16).lower()}_padded_tokens_per_s: {result['tokens_per_s']:.1f}")
    print(f"ours_real_tokens_per_s: {statistics.median(ours_rates):.1f}")
    print(f"plain_loop_real_tokens_per_s: {statistics.median(plain_rates):.1f}")
    print(f"ratio: {statistics.median(ours_rates) / statistics.median(plain_rates):.3f}")


if __name__ == "__main__":
    main()
