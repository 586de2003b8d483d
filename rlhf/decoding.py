"""Our decoding loop, the fast rollout path: left-padded prompts in, sampled (or greedy) answers and their exact
log-probabilities out. Measured against `generate` on this CPU (bench/rollout.py, docs/benchmarks.md), it saves:

- the prompt's prefill once per distinct prompt: k answers to one prompt share one prefill, copied k times;
  the distinct prompts are prefilled in groups of similar length, each padded to its own longest only;
- a static KV cache written in place (a growing cache concatenates every layer's keys and values at every step,
  which cost a third of a decoding step here);
- sampling by inverse CDF from the fp32 softmax (torch.multinomial draws an exponential per vocabulary entry,
  50 ms a step for 64 rows of a 49k vocabulary, against 5 ms);
- finished rows: a row that emitted its stop token leaves the batch (its cache rows dropped when a few have
  finished), instead of decoding padding until the longest answer ends;
- for plain Llama models on the CPU (the bundled SmolLM2), a decoding step written out (rlhf/llama_step.py):
  fused projections and prepacked bf16 weights, the same numbers as the model's forward.

Nothing changes what is sampled: each token is drawn from softmax(logits / temperature) of the logits its row's
forward pass gave, and its log-probability is read from the same fp32 log-softmax, so it equals a recomputation
at that temperature (tests/test_decoding.py checks tokens against `generate` under greedy decoding, sampling
frequencies against the tempered softmax, and log-probs against a full forward). A row's logits depend on the
rows padded beside it by rounding only, as in `generate`; in half precision PPO recomputes the sampling log-probs
by a full forward before its update (ppo/trainer.py).
"""
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from rlhf import llama_step

# A forward pass costs as much as this many more prompt tokens in it: it reads every weight once and runs a few
# thousand small operations whatever its size (SmolLM2-135M in bf16 on this 2-core CPU: 65 ms for one token, then
# 0.34 ms a token). Prompts are prefilled in groups of similar length where the padding saved is worth more.
FORWARD_COST_TOKENS = 192
# Finished rows leave the cache once the running rows fall to this share of the cache's rows: dropping them copies
# the whole cache, so it is done in a few large steps rather than at every finished row.
COMPACT_BELOW = 0.875


@dataclass
class Decoded:
    tokens: torch.Tensor    # [rows, max_new_tokens]: each answer, then `pad_id` after its stop token
    logprobs: torch.Tensor  # [rows, max_new_tokens] fp32: log p(token) under softmax(logits / T); 0 after the stop
    ended: torch.Tensor     # [rows] bool: the answer emitted its stop token
    forward_rows: int       # rows summed over the decoding steps' forward passes (what finished rows saved)


@torch.no_grad()
def decode(model, query_ids: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int, stop_id: int | None,
           pad_id: int, temperature: float = 1.0, greedy: bool = False, row_seeds: list[int] | None = None) -> Decoded:
    """Answers each left-padded prompt row of `query_ids` (mask 1 on real tokens) with up to `max_new_tokens`
    tokens, stopping a row at `stop_id` (None: every row runs the full length). Sampled at `temperature`, or the
    most likely token when `greedy`. `row_seeds`: one seed per row, so that a row's answer does not depend on the
    rows beside it (else torch's global generator draws). The model stays in its mode: callers put it in eval
    mode."""
    device = query_ids.device
    rows, prompt_length = query_ids.shape
    distinct, copy_of = distinct_rows(query_ids, query_mask)
    positions = (query_mask.cumsum(-1) - 1).clamp_min(0)
    cache = StaticCache(config=model.config, max_cache_len=prompt_length + max_new_tokens)
    next_logits = decoding_step(model, rows)
    logits = prefill(model, cache, query_ids[distinct], query_mask[distinct], positions[distinct],
                     getattr(next_logits, "cache_dtype", None))
    if len(distinct) < rows:
        select_cache_rows(cache, copy_of)
        logits = logits[copy_of]
    attention = torch.zeros(rows, prompt_length + max_new_tokens, dtype=query_mask.dtype, device=device)
    attention[:, :prompt_length] = query_mask
    last_position = positions[:, -1]
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, max_new_tokens, device=device)
    ended = torch.zeros(rows, dtype=torch.bool, device=device)
    running = torch.arange(rows, device=device)  # the batch row of each cache row
    in_cache = torch.ones(rows, dtype=torch.bool, device=device)  # cache rows still decoding
    forward_rows = 0
    uniforms = None if row_seeds is None else torch.stack(
        [torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(seed)) for seed in row_seeds]).to(device)
    for step in range(max_new_tokens):
        logp = F.log_softmax(logits.float() / temperature, dim=-1)
        chosen = logp.argmax(-1) if greedy else inverse_cdf_sample(logp, None if uniforms is None
                                                                   else uniforms[running, step])
        live = running[in_cache]
        tokens[live, step] = chosen[in_cache]
        logprobs[live, step] = logp.gather(-1, chosen[:, None]).squeeze(-1)[in_cache]
        if stop_id is not None:
            stopped = in_cache & (chosen == stop_id)
            ended[running[stopped]] = True
            in_cache &= ~stopped
        if step == max_new_tokens - 1 or not in_cache.any():
            break
        if in_cache.sum() <= COMPACT_BELOW * len(in_cache):
            keep = in_cache.nonzero().squeeze(-1)
            select_cache_rows(cache, keep)
            running, chosen, last_position = running[keep], chosen[keep], last_position[keep]
            in_cache = in_cache[keep]
        attention[running, prompt_length + step] = 1
        last_position = last_position + 1
        logits = next_logits(cache, chosen[:, None], attention[running], last_position[:, None], prompt_length + step)
        forward_rows += len(running)
    return Decoded(tokens, logprobs, ended, forward_rows)


def inverse_cdf_sample(logp: torch.Tensor, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from probabilities exp(logp): the first index whose running sum exceeds u * total, u
    uniform in [0, 1) (`uniforms`, one per row, or drawn here). A token of probability 0 adds nothing to the sum,
    so it is never the first to exceed."""
    cdf = logp.exp().cumsum(-1)
    if uniforms is None:
        uniforms = torch.rand(len(cdf), device=cdf.device)
    u = uniforms[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)


def distinct_rows(query_ids: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first row of each distinct prompt, for each row the index of its prompt among those): k answers to one
    prompt need one prefill."""
    first: dict[tuple, int] = {}
    copy_of = []
    for ids, mask in zip(query_ids.tolist(), query_mask.tolist()):
        key = tuple(i for i, m in zip(ids, mask) if m)
        copy_of.append(first.setdefault(key, len(first)))
    firsts = [copy_of.index(k) for k in range(len(first))]
    device = query_ids.device
    return torch.tensor(firsts, device=device), torch.tensor(copy_of, device=device)


def prefill(model, cache: StaticCache, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
            cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The next-token logits of each left-padded prompt row, `cache` (one row per prompt) filled with the prompts
    where the padding puts them. Prompts run in groups of similar length, each group padded only to its own
    longest prompt (a batch of prompts from 40 to 160 tokens was more than half padding). `cache_dtype`: the
    cache's, where not the dtype the forward gives its keys and values."""
    if any(type(layer) is not StaticLayer for layer in cache.layers):  # sliding windows keep their own slots
        return forward(model, cache, ids, mask, positions)
    rows, width = ids.shape
    lengths = mask.sum(-1).tolist()
    logits = None
    for group in length_groups(lengths, FORWARD_COST_TOKENS):
        group_width = max(1, max(lengths[i] for i in group))
        index = torch.tensor(group, device=ids.device)
        part = StaticCache(config=model.config, max_cache_len=group_width)
        group_logits = forward(model, part, ids[index, -group_width:], mask[index, -group_width:],
                               positions[index, -group_width:])
        if logits is None:
            logits = group_logits.new_empty(rows, group_logits.shape[-1])
        logits[index] = group_logits
        for layer, group_layer in zip(cache.layers, part.layers):
            if not layer.is_initialized:
                layer.lazy_initialization(*(tensor.new_empty((rows, *tensor.shape[1:]), dtype=cache_dtype)
                                            for tensor in (group_layer.keys, group_layer.values)))
                layer.cumulative_length.fill_(width)
            layer.keys[index, :, width - group_width:width] = group_layer.keys.to(layer.keys.dtype)
            layer.values[index, :, width - group_width:width] = group_layer.values.to(layer.values.dtype)
    return logits


def length_groups(lengths: list[int], forward_cost: int) -> list[list[int]]:
    """The indices of `lengths` in groups of neighbouring lengths that make the least padded tokens plus
    `forward_cost` per group, each group padded to its longest (an exact search over the sorted lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    cost = [0] + [None] * len(order)  # cost[end]: the best cost of the `end` shortest
    start_of = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        cost[end], start_of[end] = min((cost[start] + forward_cost + (end - start) * longest, start)
                                       for start in range(end))
    groups, end = [], len(order)
    while end:
        groups.append(order[start_of[end]:end])
        end = start_of[end]
    return groups[::-1]


def select_cache_rows(cache: StaticCache, rows: torch.Tensor) -> None:
    """Keeps (or repeats) the cache's batch rows `rows`, in that order, in every layer."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)
        layer.batch_size = len(rows)


def decoding_step(model, rows: int):
    """(cache, ids [rows, 1], attention mask, positions [rows, 1], cache slot) -> next-token logits: the written-out
    Llama step where it covers the model, else the model's forward."""
    if llama_step.supports(model):
        return llama_step.LlamaStep(model, rows)
    return lambda cache, ids, mask, positions, slot: forward(model, cache, ids, mask, positions)


def forward(model, cache: StaticCache, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The next-token logits of each row, the cache extended by `ids`."""
    output = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                   **{cache_argument(model): cache})
    return output.logits[:, -1]


def cache_argument(model) -> str:
    """transformers 5 renames `past_key_values` to `cache` (the old name warns, then goes)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
