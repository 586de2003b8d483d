"""The written-out Llama decoding step (rlhf/llama_step.py) gives the model's own numbers: the same logits, the
same tokens and log-probs through the decoding loop, in bf16 and fp32; models it does not cover keep their
forward."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ppo.rollout import encode_prompts
from rlhf import llama_step
from rlhf.decoding import decode
from tests.test_decoding import PROMPTS, noisy_tiny_model


def loaded(path, dtype):
    model, tokenizer = noisy_tiny_model(path, eos_boost=3.0)
    return model.to(dtype), tokenizer


@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, False), (torch.float32, False),
                                             (torch.float32, True)], ids=["bf16", "fp32", "fp32-under-bf16-autocast"])
def test_the_decoding_loop_gives_the_same_tokens_and_logprobs_with_and_without_the_written_out_step(
        tiny_model_path, monkeypatch, dtype, autocast):
    """fp32 weights under a bf16 autocast: PPO's mixed precision, where the rollouts run."""
    model, tokenizer = loaded(tiny_model_path, dtype)
    ids, mask = encode_prompts(tokenizer, [PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2], PROMPTS[3]])
    seeds = list(range(len(ids)))
    runs = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert llama_step.supports(model)
        for written_out in (True, False):
            monkeypatch.setattr(llama_step, "supports", lambda m, answer=written_out: answer)
            runs[written_out] = [decode(model, ids, mask, 12, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                        temperature=0.7, row_seeds=seeds),
                                 decode(model, ids, mask, 12, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                        greedy=True)]
    for ours, theirs in zip(runs[True], runs[False]):
        assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(ours.logprobs, theirs.logprobs)
        assert torch.equal(ours.ended, theirs.ended) and ours.forward_rows == theirs.forward_rows
    # a real test: rows ended at different steps, and the answers are not one token repeated
    assert 0 < int(runs[True][0].ended.sum()) < len(ids)
    assert len(set(runs[True][0].tokens.flatten().tolist())) > 3


def test_one_step_gives_the_models_logits_and_cache_exactly(tiny_model_path):
    from rlhf.decoding import forward
    from transformers import StaticCache

    model, tokenizer = loaded(tiny_model_path, torch.bfloat16)
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    caches = [StaticCache(config=model.config, max_cache_len=ids.shape[1] + 4) for _ in range(2)]
    first = [forward(model, cache, ids, mask, positions) for cache in caches]
    token = first[0].argmax(-1)[:, None]
    attention = torch.cat([mask, torch.ones(len(ids), 1, dtype=mask.dtype), torch.zeros(len(ids), 3, dtype=mask.dtype)],
                          1)
    theirs = forward(model, caches[0], token, attention, positions[:, -1:] + 1)
    ours = llama_step.LlamaStep(model, len(ids))(caches[1], token, attention, positions[:, -1:] + 1, ids.shape[1])
    assert torch.equal(ours, theirs)
    for mine, model_s in zip(caches[1].layers, caches[0].layers):
        assert torch.equal(mine.keys, model_s.keys) and torch.equal(mine.values, model_s.values)


def test_models_it_does_not_cover_keep_their_forward(tiny_model_path):
    model, _ = loaded(tiny_model_path, torch.float32)
    assert llama_step.supports(model)
    assert not llama_step.supports(model.train())
    model.eval()
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert not llama_step.supports(lora) and not llama_step.supports(lora.get_base_model())
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    assert llama_step.supports(LlamaForCausalLM(LlamaConfig(**small)).eval())
    assert not llama_step.supports(LlamaForCausalLM(LlamaConfig(**small, attention_bias=True)).eval())
    assert not llama_step.supports(LlamaForCausalLM(LlamaConfig(**small, attn_implementation="eager")).eval())
    assert not llama_step.supports(torch.nn.Linear(2, 2))
    embedding_adapter = LlamaForCausalLM(LlamaConfig(**small)).eval()
    get_peft_model(embedding_adapter, LoraConfig(r=2, target_modules=["embed_tokens"]))
    assert not llama_step.supports(embedding_adapter)  # a LoRA on the embeddings, the projections left plain
    hooked = LlamaForCausalLM(LlamaConfig(**small)).eval()
    hooked.model.layers[0].mlp.register_forward_hook(lambda module, inputs, output: output * 2)
    assert not llama_step.supports(hooked)
    # accelerate's mixed precision wraps a prepared model's forward in an autocast (keeping the original forward
    # beside it): the step runs only where that autocast is on around the decoding too, as in PPO's rollouts
    prepared = LlamaForCausalLM(LlamaConfig(**small)).eval()
    prepared._original_forward = prepared.forward
    prepared.forward = torch.autocast("cpu", dtype=torch.bfloat16)(prepared.forward)
    assert not llama_step.supports(prepared)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert llama_step.supports(prepared)


SMALL_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)
VARIANTS = {"MLP width 48": dict(intermediate_size=48), "one query head a key head": dict(num_key_value_heads=4),
            "head_dim 12": dict(head_dim=12), "untied head": dict(tie_word_embeddings=False),
            "llama3 rope": dict(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                                     original_max_position_embeddings=16)),
            "dynamic rope": dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
                                 max_position_embeddings=8)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_shapes_and_rotary_kinds_step_as_their_forward(variant, dtype):
    from rlhf.decoding import forward
    from transformers import StaticCache

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL_LLAMA, **VARIANTS[variant]})).eval().to(dtype)
    assert llama_step.supports(model)
    ids = torch.randint(3, 64, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3], mask[2, :5] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    caches = [StaticCache(config=model.config, max_cache_len=12) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            forward(model, cache, ids, mask, positions)
    token = torch.randint(3, 64, (3, 1))
    attention = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype), torch.zeros(3, 4, dtype=mask.dtype)], 1)
    with torch.no_grad():
        theirs = forward(model, caches[0], token, attention, positions[:, -1:] + 1)
    ours = llama_step.LlamaStep(model, 3)(caches[1], token, attention, positions[:, -1:] + 1, 7)
    assert torch.equal(ours.float(), theirs.float())


def test_bf16_weights_under_an_fp16_autocast_decode_as_their_forward(monkeypatch):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA)).eval().to(torch.bfloat16)
    ids = torch.randint(3, 64, (3, 12))
    runs = {}
    with torch.autocast("cpu", dtype=torch.float16):
        for written_out in (True, False):
            monkeypatch.setattr(llama_step, "supports", lambda m, answer=written_out: answer)
            runs[written_out] = decode(model, ids, torch.ones_like(ids), 6, None, 0, greedy=True)
    assert torch.equal(runs[True].tokens, runs[False].tokens)
    assert torch.equal(runs[True].logprobs, runs[False].logprobs)


def test_with_onednn_off_the_step_keeps_f_linear_and_the_forwards_numbers(monkeypatch):
    """The prepacked products match F.linear only where F.linear runs on oneDNN too: checked before packing."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL_LLAMA, "hidden_size": 576, "intermediate_size": 1536,
                                            "num_attention_heads": 9, "num_key_value_heads": 3})).eval()
    model.to(torch.bfloat16)
    ids = torch.randint(3, 64, (8, 6))
    assert llama_step.LlamaStep(model, 8).head.packed == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    with torch.backends.mkldnn.flags(enabled=False):
        assert not llama_step.LlamaStep(model, 8).head.packed
        runs = {}
        for written_out in (True, False):
            monkeypatch.setattr(llama_step, "supports", lambda m, answer=written_out: answer)
            runs[written_out] = decode(model, ids, torch.ones_like(ids), 4, None, 0, greedy=True)
    assert torch.equal(runs[True].logprobs, runs[False].logprobs)
