"""`rlhf label sample`: k sampled responses per prompt, stored with their comparisons in a named batch.

Every pair of a prompt's responses becomes one comparison, its a/b order drawn at random so that position says
nothing about sampling order. A batch name is used once: sampling into an existing batch is refused.
"""
import itertools
import random
from pathlib import Path

import torch
from tqdm import tqdm

from rlhf import models
from rlhf.config import RunConfig
from rlhf.datasets import load_rows
from rlhf.errors import MissingInputError, UserError
from rlhf.generation import generate_responses
from rlhf.runs import RunDir
from rlhf.store import Store
from preference_ui.config import LabelsConfig


def model_spec(config: LabelsConfig, run: RunConfig) -> str:
    if config.model:
        return config.model
    sft = RunDir(run.output_root, run.name).stage_path("sft")
    if not (sft / "config.json").exists():
        raise MissingInputError(f"no SFT model at {sft}: run `rlhf sft --config ... --run.name {run.name}` first, "
                                "or set --labels.model")
    return str(sft)


def main(config: LabelsConfig, run: RunConfig) -> dict:
    prompts = load_rows(config.prompts, "prompt")
    prompts = prompts[:config.num_prompts] if config.num_prompts else prompts
    spec, batch = model_spec(config, run), config.batch or run.name
    store = Store(config.db or None)
    if store.comparisons(batch):
        raise UserError(f"batch '{batch}' already has comparisons in the store; choose another --labels.batch")
    model, tokenizer = models.load_causal_lm(spec)
    torch.manual_seed(config.seed)
    sampling = {"temperature": config.temperature, "top_k": 0, "top_p": 1.0, "max_new_tokens": config.max_new_tokens,
                "seed": config.seed}
    rng = random.Random(config.seed)
    comparisons = 0
    starts = range(0, len(prompts), config.batch_size)
    for start in tqdm(starts, desc=f"sampling {config.responses_per_prompt} responses per prompt", unit="batch"):
        chunk = prompts[start:start + config.batch_size]
        answers = [generate_responses(model, tokenizer, [p["prompt"] for p in chunk], config.max_new_tokens,
                                      config.batch_size, do_sample=True, temperature=config.temperature)
                   for _ in range(config.responses_per_prompt)]
        for i, row in enumerate(chunk):
            stored_prompt = store.add_prompt(row["id"], row["category"], row["prompt"])
            responses = [store.add_response(stored_prompt, sample[i], spec, sampling) for sample in answers]
            for first, second in itertools.combinations(responses, 2):
                a, b = (first, second) if rng.random() < 0.5 else (second, first)
                store.add_comparison(a, b, batch=batch)
                comparisons += 1
    summary = {"batch": batch, "prompts": len(prompts), "responses": len(prompts) * config.responses_per_prompt,
               "comparisons": comparisons, "model": spec, "store": str(store.engine.url)}
    print(f"[label sample] {summary['comparisons']} comparisons from {summary['prompts']} prompts in batch "
          f"'{batch}' ({Path(spec).name})")
    return summary
