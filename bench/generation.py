"""Generation speed against this machine's limit: candidate sampling as `rlhf label sample` does it (k sampled
answers per prompt, batched by prompt length) at several batch sizes and dtypes, beside the matmul rate measured
in the same call.

    python bench/generation.py [--model smollm2-135m-instruct] [--prompts 32] [--k 4] [--tokens 48]
                               [--batches 16,64,128] [--dtypes bf16,fp32]

A generated token costs at least 2N FLOPs (N parameters; the tied embedding counted once, as the LM head), so
the limit is matmul FLOP/s / 2N tokens/s. Prompt tokens are not counted: the prefill's FLOPs come on top, so the
share of the limit is a lower bound. Prints `name: value` lines; last `ratio: X` = the best generated tokens/s
over the limit in that dtype.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parent.parent  # the repository's files are read from there, wherever this runs
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from rlhf import models  # noqa: E402
from rlhf.datasets import load_rows  # noqa: E402
from rlhf.generation import answer_prompts  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32, help="Prompts from data/rl_prompts.jsonl.")
    parser.add_argument("--k", type=int, default=4, help="Sampled answers per prompt.")
    parser.add_argument("--tokens", type=int, default=48, help="Longest answer, in tokens.")
    parser.add_argument("--batches", default="16,64,128", help="Comma-separated generation batch sizes.")
    parser.add_argument("--dtypes", default="bf16,fp32", help="Comma-separated: bf16, fp32.")
    return parser.parse_args(argv)


def matmul_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """FLOP/s of a square matmul in `dtype` on `device`, the median of `repeats` after a warm-up."""
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times)


def generated_tokens_per_s(model, tokenizer, prompts: list, args, batch_size: int) -> tuple[float, int, float]:
    """(tokens/s, tokens, seconds) of sampling args.k answers per prompt; tokens counted through the stop token."""
    torch.manual_seed(0)
    start = time.perf_counter()
    answers = answer_prompts(model, tokenizer, [p for p in prompts for _ in range(args.k)], args.tokens,
                             batch_size, do_sample=True, temperature=0.7)
    seconds = time.perf_counter() - start
    tokens = sum(len(answer.ids) for answer in answers)
    return tokens / seconds, tokens, seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    prompts = [row["prompt"] for row in load_rows(REPO / "data" / "rl_prompts.jsonl", "prompt")[:args.prompts]]
    print(f"threads: {torch.get_num_threads()}  prompts: {len(prompts)} x {args.k} answers of up to {args.tokens} "
          f"tokens", flush=True)
    ratio = 0.0
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        model, tokenizer = models.load_causal_lm(args.model, dtype)
        params = sum(p.numel() for p in model.parameters())
        answer_prompts(model, tokenizer, prompts[:2], 4, 2)  # warm-up
        rate = matmul_flops(dtype)
        limit = rate / (2 * params)
        print(f"{name} matmul_gflops: {rate / 1e9:.1f}  params: {params / 1e6:.1f}M  limit_tokens_per_s: "
              f"{limit:.0f}", flush=True)
        best = 0.0
        for batch_size in (int(b) for b in args.batches.split(",")):
            speed, tokens, seconds = generated_tokens_per_s(model, tokenizer, prompts, args, batch_size)
            best = max(best, speed)
            print(f"{name} batch {batch_size}: {tokens} tokens in {seconds:.1f} s, {speed:.1f} tokens/s, "
                  f"{speed / limit:.1%} of the limit", flush=True)
        print(f"{name} best_tokens_per_s: {best:.1f}  share_of_limit: {best / limit:.3f}", flush=True)
        if name == args.dtypes.split(",")[0]:
            ratio = best / limit
        del model
    print(f"ratio: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
