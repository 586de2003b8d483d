"""Our decoding loop (rlhf/decoding.py) against `generate`: the same tokens under greedy decoding, with shared
prefills and rows that finish early; the sampler's frequencies; the prompt grouping by hand. The sampling
distribution over a whole rollout and the log-probs against a recomputation: tests/test_ppo_rollout.py."""
import re
import subprocess
import sys

import pytest
import torch

from ppo.rollout import encode_prompts
from rlhf import models
from rlhf import decoding
from rlhf.decoding import decode, distinct_rows, inverse_cdf_sample, length_groups
from tests.conftest import REPO

PROMPTS = [[{"role": "user", "content": text}] for text in
           ("Hi.", "Tell me a long story about a lighthouse keeper and her cat, please.", "Why is the sky blue?",
            "Ok?")]


def noisy_tiny_model(path, eos_boost: float):
    """The tiny model repeats one token whatever it is asked: noise makes its answers differ by prompt, and
    raising the stop token's logit makes some of them end early."""
    model, tokenizer = models.load_causal_lm(str(path))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
        model.lm_head.weight[tokenizer.eos_token_id] *= eos_boost
    return model.eval(), tokenizer


@pytest.mark.parametrize("forward_cost", [decoding.FORWARD_COST_TOKENS, 0])
def test_greedy_tokens_equal_generate_with_shared_prefills_and_early_stops(tiny_model_path, monkeypatch, forward_cost):
    """At a forward cost of 0 tokens each prompt length is prefilled in a group of its own."""
    monkeypatch.setattr(decoding, "FORWARD_COST_TOKENS", forward_cost)
    length = 16
    # the 2nd and 4th prompts twice each: 6 rows, 4 prefills
    ids, mask = encode_prompts(models.load_tokenizer(str(tiny_model_path)),
                               [PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2], PROMPTS[3], PROMPTS[3]])
    for boost in (1.0, 2.0, 3.0, 4.0, 6.0, 8.0):
        model, tokenizer = noisy_tiny_model(tiny_model_path, boost)
        ours = decode(model, ids, mask, length, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
        if 0 < int(ours.ended.sum()) < len(ids) - 1:
            break
    assert 0 < int(ours.ended.sum()) < len(ids) - 1, "no stop-token boost gave answers that end at different steps"
    with torch.no_grad():
        theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=length, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    theirs = theirs[:, ids.shape[1]:]
    theirs = torch.cat([theirs, theirs.new_full((len(ids), length - theirs.shape[1]), tokenizer.pad_token_id)], 1)
    assert torch.equal(ours.tokens, theirs)
    assert torch.equal(ours.ended, (theirs == tokenizer.eos_token_id).any(-1))
    # finished rows left the batch: fewer rows went through the decoding steps than rows x steps
    assert ours.forward_rows < len(ids) * (length - 1)
    # log-probs are 0 after each stop token and negative before
    for row, logprobs in zip(ours.tokens.tolist(), ours.logprobs):
        end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else length
        assert (logprobs[:end] < 0).all() and (logprobs[end:] == 0).all()


def test_the_inverse_cdf_sampler_follows_the_probabilities_and_never_draws_a_zero():
    probabilities = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.2])
    logp = probabilities.log().expand(20000, -1)
    drawn = inverse_cdf_sample(logp, torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    frequencies = torch.bincount(drawn, minlength=5).float() / len(drawn)
    assert frequencies[1] == 0 and frequencies[3] == 0
    assert (frequencies - probabilities).abs().max() < 0.015


def test_prompts_are_prefilled_in_groups_of_neighbouring_lengths_that_cost_least():
    lengths = [40, 160, 44, 150, 42]
    # one group: 5 x 160 + 100 = 900; the short three and the long two: 3 x 44 + 2 x 160 + 200 = 652
    assert length_groups(lengths, 100) == [[0, 4, 2], [3, 1]]
    assert length_groups(lengths, 1000) == [[0, 4, 2, 3, 1]]
    assert length_groups(lengths, 0) == [[0], [4], [2], [3], [1]]
    assert length_groups([7, 9, 7], 0) == [[0, 2], [1]]  # equal lengths share a group: no padding, one forward
    assert length_groups([], 10) == []


def test_a_grouped_prefill_fills_the_cache_and_logits_as_one_padded_batch(tiny_model_path, monkeypatch):
    from transformers import StaticCache

    model, tokenizer = noisy_tiny_model(tiny_model_path, 1.0)
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    filled = {}
    for cost in (10 ** 6, 0):  # one group; a group per prompt length
        monkeypatch.setattr(decoding, "FORWARD_COST_TOKENS", cost)
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 3)
        with torch.no_grad():
            filled[cost] = decoding.prefill(model, cache, ids, mask, positions), cache
    (one_logits, one_cache), (grouped_logits, grouped_cache) = filled.values()
    assert len(length_groups(mask.sum(-1).tolist(), 0)) == len(set(mask.sum(-1).tolist())) == 3
    # fp32 sums over other batch shapes run in another order: rounding of ~1e-5 (seen on an AMD EPYC), not 1e-3
    close = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grouped_logits, one_logits, **close)
    real = mask.bool()
    for one, grouped in zip(one_cache.layers, grouped_cache.layers):
        for name in ("keys", "values"):
            mine, theirs = getattr(grouped, name), getattr(one, name)
            assert mine.shape == theirs.shape
            # the prompts' own slots agree; padding slots are masked out (zeros in the grouped cache)
            torch.testing.assert_close(mine[:, :, :ids.shape[1]].transpose(1, 2)[real],
                                       theirs[:, :, :ids.shape[1]].transpose(1, 2)[real], **close)
            assert (mine[:, :, :ids.shape[1]].transpose(1, 2)[~real] == 0).all()
        assert int(grouped.cumulative_length) == int(one.cumulative_length) == ids.shape[1]


def test_rows_of_one_prompt_share_a_prefill_whatever_their_padding():
    ids = torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9], [0, 0, 5, 6], [9, 9, 5, 6], [0, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    firsts, copy_of = distinct_rows(ids, mask)
    assert firsts.tolist() == [0, 1] and copy_of.tolist() == [0, 1, 0, 0, 1]


def test_the_rollout_benchmark_runs_both_sides_on_every_workload_and_prints_the_ratio(tiny_model_path):
    result = subprocess.run([sys.executable, "bench/rollout.py", "--model", str(tiny_model_path), "--prompts", "4",
                             "--k", "2", "--batch", "4", "--batch-ppo", "4", "--group", "2", "--tokens", "6",
                             "--rounds", "1", "--dtype", "fp32"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    values = dict(re.findall(r"(\w+): ([\d.]+)", result.stdout))
    for workload, rows in (("sampling", 8), ("group", 4), ("ppo", 4)):
        assert int(values[f"{workload}_rows"]) == rows
        assert float(values[f"{workload}_ratio"]) == pytest.approx(
            float(values[f"{workload}_generate_s"]) / float(values[f"{workload}_ours_s"]), rel=0.05)
    generate, ours = (sum(float(values[f"{w}_{side}_s"]) for w in ("sampling", "group", "ppo"))
                      for side in ("generate", "ours"))
    assert result.stdout.strip().splitlines()[-1] == f"ratio: {float(values['ratio']):.3f}"
    assert float(values["ratio"]) == pytest.approx(generate / ours, rel=0.05)


def test_a_model_with_a_sliding_window_keeps_one_prefill_and_decodes_as_generate(tiny_model_path):
    """A sliding-window cache keeps its own slots: its prompts are prefilled in one padded batch, as before."""
    from transformers import MistralConfig, MistralForCausalLM, StaticCache
    from transformers.cache_utils import StaticLayer

    tokenizer = models.load_tokenizer(str(tiny_model_path))
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    assert any(type(layer) is not StaticLayer for layer in StaticCache(config=config, max_cache_len=64).layers)
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    ours = decode(model, ids, mask, 6, None, tokenizer.pad_token_id, greedy=True)
    with torch.no_grad():
        theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(ours.tokens, theirs[:, ids.shape[1]:])
