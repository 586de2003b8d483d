"""One decoding step of a Llama-architecture model (SmolLM2, Llama), written out for the decoding loop
(rlhf/decoding.py) on the CPU: the same operations as transformers' forward with its SDPA attention over the
same static cache, so the same numbers (tests/test_llama_step.py checks logits and tokens for equality), with
less around them.

A decoding step reads every weight for a single token per row, so on this CPU it is bound by memory and by the
few thousand small operations around the matrix products. Here:
- the query, key and value projections are one matrix product, as are the MLP's gate and up projections (their
  weights concatenated once per decoding call: the rows of the product are the same dot products);
- in bf16, every weight is reordered once per call into oneDNN's blocked layout (`mkldnn._linear_pointwise`:
  the same results as `F.linear` where that runs on oneDNN too, checked on one weight first; without reordering
  the weight at every product);
- the mask, rotary angles and module plumbing are built once per step, not once per layer.
The concatenated and reordered weights are a second copy of the weights while a decoding call runs (270 MB for
SmolLM2-135M in bf16), rebuilt at each call since PPO changes the weights between calls (about 0.1 s here).
Prefills stay with the model's own forward. Models this does not cover (other architectures, biases, LoRA
adapters, forward hooks, sharded or offloaded parameters, other attention implementations, GPUs) keep the model's
forward.
"""
import os

import torch
import torch.nn.functional as F
from torch import nn


def supports(model) -> bool:
    """Whether `model` is a plain Llama whose decoding step this module computes as transformers does."""
    config = getattr(model, "config", None)
    if type(model).__name__ != "LlamaForCausalLM" or config is None or model.training:
        return False
    if config._attn_implementation != "sdpa" or config.hidden_act != "silu":
        return False
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return False
    if getattr(config, "pretraining_tp", 1) != 1 or getattr(model, "_hf_hook", None) is not None:
        return False
    if os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1":  # transformers then attends another way
        return False
    if getattr(model, "_original_forward", None) is not None and not torch.is_autocast_enabled("cpu"):
        return False  # accelerate wrapped the forward in an autocast of its own, which the step would not be under
    if any(type(m) is not nn.Linear for m in projections(model)):  # LoRA and quantised layers replace them
        return False
    base = model.model
    norms = [base.norm] + [norm for layer in base.layers for norm in (layer.input_layernorm,
                                                                       layer.post_attention_layernorm)]
    if type(base.embed_tokens) is not nn.Embedding or any(type(m).__name__ != "LlamaRMSNorm" for m in norms):
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):  # adapters and wrappers hook in
        return False
    return all(type(p.data) is torch.Tensor and p.device.type == "cpu" and not hasattr(p, "ds_id")
               and p.dtype == model.dtype for p in model.parameters())


def projections(model) -> list:
    """Every matrix product of the step: each layer's seven projections and the LM head."""
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
    return [layer.get_submodule(name) for layer in model.model.layers for name in names] + [model.lm_head]


def products_dtype(model) -> torch.dtype:
    """The dtype of the forward's matrix products: autocast's when it is on (PPO's mixed precision: fp32 weights,
    bf16 products), else the weights'."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else model.dtype


def packing_agrees(weight: torch.Tensor, rows: int) -> bool:
    """Whether oneDNN's prepacked bf16 product gives F.linear's numbers to the bit here: so where F.linear itself
    runs on oneDNN (CPUs with bf16 support, oneDNN on), checked on one of the step's weights."""
    if not (torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    x = torch.randn(rows, 1, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    weight = weight.to(torch.bfloat16)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    return torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), F.linear(x, weight))


class Linear:
    """y = x W^T as F.linear computes it in `dtype` (under autocast too), through oneDNN's prepacked weight where
    `packed`."""

    def __init__(self, weight: torch.Tensor, rows: int, dtype: torch.dtype, packed: bool):
        self.dtype, self.packed = dtype, packed
        weight = weight.to(dtype)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows) if packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, None, "none", [], "")
        return F.linear(x, self.weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic: normalised in fp32, cast back, then scaled."""
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers applies it (the two halves of each head swapped, the first negated)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LlamaStep:
    """Next-token logits for one new token per row, the static cache extended at `slot`."""

    @torch.no_grad()
    def __init__(self, model, rows: int):
        dtype = products_dtype(model)
        with torch.autocast("cpu", enabled=False):  # weights concatenated as they are (fp16 autocast refuses bf16)
            self.build(model, rows, dtype)

    def build(self, model, rows: int, dtype: torch.dtype) -> None:
        config, base = model.config, model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.rotary = base.rotary_emb
        self.embed = base.embed_tokens.weight
        self.layers = []
        layers = base.layers[:config.num_hidden_layers]  # as transformers' forward reads them
        packed = dtype == torch.bfloat16 and packing_agrees(layers[0].self_attn.q_proj.weight, rows)
        # Under autocast the rotated keys come out in fp32 and attention reads them in `dtype`: the cache holds them
        # in `dtype` (the same rounding, once at the write, not the whole cache at every layer and step).
        self.cache_dtype = dtype
        for layer in layers:
            attention, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            self.layers.append((layer.input_layernorm.weight, Linear(qkv, rows, dtype, packed),
                                Linear(attention.o_proj.weight, rows, dtype, packed),
                                layer.post_attention_layernorm.weight, Linear(gate_up, rows, dtype, packed),
                                Linear(mlp.down_proj.weight, rows, dtype, packed)))
        self.norm = base.norm.weight
        self.head = Linear(model.lm_head.weight, rows, dtype, packed)

    @torch.no_grad()
    def __call__(self, cache, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
                 slot: int) -> torch.Tensor:
        """`ids` [rows, 1], `attention` [rows, cache length] (1 where a row attends, its new slot included),
        `positions` [rows, 1]: the logits [rows, vocabulary]."""
        rows = len(ids)
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(ids, self.embed)
        cos, sin = self.rotary(x, positions)  # [rows, 1, head_dim]: the same angles for every head
        # the additive mask SDPA makes of transformers' boolean one, made once a step rather than once a layer
        mask = torch.zeros(attention.shape, dtype=x.dtype, device=x.device).masked_fill_(attention == 0, -torch.inf)
        mask = mask[:, None, None, :]
        for index, (norm_in, qkv, out, norm_post, gate_up, down) in enumerate(self.layers):
            qk, v = qkv(rms_norm(x, norm_in, self.eps)).split([(heads + kv_heads) * head_dim, kv_heads * head_dim],
                                                               dim=-1)
            q, k = rotate(qk.view(rows, heads + kv_heads, head_dim), cos, sin).split([heads, kv_heads], dim=1)
            layer = cache.layers[index]
            layer.keys[:, :, slot] = k
            layer.values[:, :, slot] = v.view(rows, kv_heads, head_dim)
            # transformers' SDPA path for one query token: each key/value head's query heads are its queries
            attended = F.scaled_dot_product_attention(
                q.reshape(rows, kv_heads, heads // kv_heads, head_dim), layer.keys, layer.values, attn_mask=mask,
                scale=head_dim ** -0.5)
            x = x + out(attended.reshape(rows, 1, heads * head_dim))
            gate, up = gate_up(rms_norm(x, norm_post, self.eps)).chunk(2, dim=-1)
            x = x + down(F.silu(gate.contiguous()) * up)  # silu's vector and scalar tails differ in a bit
        return self.head(rms_norm(x, self.norm, self.eps))[:, -1]
