"""Our decoding loop (rlhf/decoding.py) against plain `generate`, on the same left-padded prompts, the same model
and dtype, in one call. Three workloads, as the default run generates:

- sampling: candidate answers for the labellers, k answers to each prompt in batches of `--batch` rows
  (`rlhf label sample`);
- group: a GRPO / RLOO rollout, `--group` answers to each of `--batch-ppo / --group` prompts;
- ppo: a PPO rollout, `--batch-ppo` distinct prompts.

The sizes default to configs/default.yaml's (preferences.responses_per_prompt, preferences.batch_size,
ppo.batch_size, ppo.num_generations, ppo.response_length, ppo.temperature), so the workloads follow the default run.

    python bench/rollout.py [--model smollm2-135m-instruct] [--prompts 16] [--k K] [--batch B] [--batch-ppo B]
                            [--group G] [--tokens T] [--temperature T] [--rounds 2] [--dtype auto]

Both sample at the temperature with no top-k or top-p and stop a row at the stop token (`generate` stops when
every row has). Tokens are counted through each answer's stop token. The limit line is this CPU's matmul rate
over 2N FLOPs per token. Prints `name: value` lines; per workload the median seconds of each side and their
ratio; last line `ratio: X` = generate's seconds over ours, summed over the three workloads.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from generation import matmul_flops  # noqa: E402  (bench/generation.py)

from ppo.config import PPOStageConfig  # noqa: E402
from ppo.rollout import encode_prompts  # noqa: E402
from preference_ui.config import PreferencesStageConfig  # noqa: E402
from rlhf import models  # noqa: E402
from rlhf.datasets import load_rows  # noqa: E402
from rlhf.decoding import decode  # noqa: E402
from rlhf import hardware  # noqa: E402
from rlhf.config import load_config  # noqa: E402


def default_sizes() -> dict:
    """The default run's generation sizes, read from configs/default.yaml (missing keys: the stages' defaults)."""
    config = load_config(REPO / "configs" / "default.yaml", [],
                         {"preferences": PreferencesStageConfig, "ppo": PPOStageConfig})
    preferences, ppo = config["preferences"], config["ppo"]
    return {"k": preferences.responses_per_prompt, "batch": preferences.batch_size, "batch_ppo": ppo.batch_size,
            "group": ppo.num_generations, "tokens": ppo.response_length, "temperature": ppo.temperature}


def parse_args(argv=None):
    sizes = default_sizes()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16, help="Prompts from data/rl_prompts.jsonl (sampling).")
    from_the_default_run = {"--k": ("k", int, "Sampled answers per prompt (sampling)."),
                            "--batch": ("batch", int, "Rows per generation batch (sampling)."),
                            "--batch-ppo": ("batch_ppo", int, "Rows per rollout (group and ppo)."),
                            "--group": ("group", int, "Answers per prompt in the group rollout."),
                            "--tokens": ("tokens", int, "Longest answer, in tokens."),
                            "--temperature": ("temperature", float, "Sampling temperature.")}
    for flag, (key, kind, text) in from_the_default_run.items():
        parser.add_argument(flag, type=kind, default=sizes[key], help=f"{text} %(default)s: the default run's.")
    parser.add_argument("--rounds", type=int, default=2, help="Timed rounds per side (after a warm-up).")
    parser.add_argument("--dtype", default="auto", help="auto (the hardware's), bf16 or fp32.")
    return parser.parse_args(argv)


def workloads(prompts: list, args) -> dict[str, list[list]]:
    """Each workload's batches of chat prompts (rows of one prompt are contiguous, as the stages lay them out)."""
    sampling = [p for p in prompts for _ in range(args.k)]
    groups = args.batch_ppo // args.group
    return {"sampling": [sampling[i:i + args.batch] for i in range(0, len(sampling), args.batch)],
            "group": [[p for p in prompts[:groups] for _ in range(args.group)]],
            "ppo": [prompts[:args.batch_ppo]]}


@torch.no_grad()
def plain_generate(model, tokenizer, ids, mask, args) -> int:
    output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.tokens, do_sample=True,
                            temperature=args.temperature, top_k=0, top_p=1.0, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return answer_tokens(output[:, ids.shape[1]:], tokenizer.eos_token_id)


def ours(model, tokenizer, ids, mask, args) -> int:
    decoded = decode(model, ids, mask, args.tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                     temperature=args.temperature)
    return answer_tokens(decoded.tokens, tokenizer.eos_token_id)


def answer_tokens(tokens: torch.Tensor, stop_id: int) -> int:
    """Tokens through each row's first stop token (all of the row when it has none)."""
    is_stop = tokens == stop_id
    lengths = torch.where(is_stop.any(-1), is_stop.float().argmax(-1) + 1, tokens.shape[1])
    return int(lengths.sum())


def timed(side, model, tokenizer, batches, args) -> tuple[float, int]:
    """(seconds, answer tokens) of one side over a workload's batches."""
    start, tokens = time.perf_counter(), 0
    for ids, mask in batches:
        tokens += side(model, tokenizer, ids, mask, args)
    return time.perf_counter() - start, tokens


def main(argv=None) -> int:
    args = parse_args(argv)
    chosen = hardware.choose(args.dtype)
    dtype = chosen.dtype
    model, tokenizer = models.load_causal_lm(args.model, dtype)
    model.to(chosen.device).eval()
    prompts = [row["prompt"] for row in load_rows(REPO / "data" / "rl_prompts.jsonl", "prompt")[:args.prompts]]
    params = sum(p.numel() for p in model.parameters())
    limit = matmul_flops(dtype, device=chosen.device) / (2 * params)
    print(f"device: {chosen.device}  threads: {torch.get_num_threads()}  dtype: {dtype}  params: {params / 1e6:.1f}M  "
          f"limit_tokens_per_s: {limit:.0f}", flush=True)
    sides = {"generate": plain_generate, "ours": ours}
    totals = {name: 0.0 for name in sides}
    for workload, chats in workloads(prompts, args).items():
        batches = [tuple(t.to(chosen.device) for t in encode_prompts(tokenizer, chat)) for chat in chats]
        for side in sides.values():  # both warmed up alike: the first calls' costs are no one's
            side(model, tokenizer, *batches[0], argparse.Namespace(**{**vars(args), "tokens": 2}))
        seconds = {name: [] for name in sides}
        for round_index in range(args.rounds):
            order = list(sides) if round_index % 2 == 0 else list(reversed(sides))  # alternate who goes first
            for name in order:
                torch.manual_seed(round_index)
                spent, tokens = timed(sides[name], model, tokenizer, batches, args)
                seconds[name].append(spent)
                print(f"{workload} round {round_index} {name}: {spent:.2f} s, {tokens} tokens, "
                      f"{tokens / spent:.1f} tokens/s ({tokens / spent / limit:.1%} of the limit)", flush=True)
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        for name, value in medians.items():
            totals[name] += value
        print(f"{workload}_rows: {sum(len(chat) for chat in chats)}  {workload}_generate_s: "
              f"{medians['generate']:.4f}  {workload}_ours_s: {medians['ours']:.4f}  {workload}_ratio: "
              f"{medians['generate'] / medians['ours']:.3f}", flush=True)
    print(f"ratio: {totals['generate'] / totals['ours']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
