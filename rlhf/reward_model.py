"""Loading and scoring reward models: a sequence classifier with one output per ensemble head, pooled over the
sequence in one of two ways (the model's `config.reward_pooling`, saved with it):

- `last_token`: the head read at the last token that is not padding (TRL's and transformers' reward model);
- `answer_mean`: the head read at every token of the answer and averaged. Each answer token then gets its own
  gradient, where the last token must first learn to gather what the answer said; from a few hundred pairs it
  learns word-level preferences far better (docs/benchmarks.md, "Reward pooling")."""

import contextlib
import logging

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from rlhf import models
from rlhf.errors import ModelError
from rlhf.runs import read_stage_record

log = logging.getLogger(__name__)

POOLINGS = ("last_token", "answer_mean")

# Special tokens that can stand in as padding when a tokenizer pads with its EOS token.
SPARE_PAD_TOKENS = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<unk>")


def reward_tokenizer(path: str):
    """The model's tokenizer with a pad token distinct from EOS: a sequence classifier scores the last token
    that is not padding, so padding with EOS would hide the end of every response."""
    tokenizer = models.load_tokenizer(path)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer
    vocab = tokenizer.get_vocab()
    spare = next((token for token in SPARE_PAD_TOKENS if token in vocab and vocab[token] != tokenizer.eos_token_id),
                 None)
    if spare is None:
        raise ModelError(f"{path}: the tokenizer has no pad token (or pads with its EOS token) and no other special "
                         "token to pad with "
                         f"(looked for {', '.join(SPARE_PAD_TOKENS)}); add a pad token to the tokenizer")
    tokenizer.pad_token = spare
    return tokenizer


def load_reward_model(path: str, tokenizer, heads: int = 1, dtype=torch.float32, pooling: str | None = None):
    """A sequence classifier with `heads` outputs (1, or an ensemble) on the model at `path`. A published reward
    model keeps its own number of heads and pooling; a new one pools as `pooling` says (default last_token)."""
    heads = reward_record(path).get("heads", heads)
    new_head = not any(name.endswith("ForSequenceClassification")
                       for name in AutoConfig.from_pretrained(path).architectures or [])
    # A new score head on a language model (its LM head dropped) is how a reward model starts: transformers'
    # 7-line load report saying so is left out then, and anything else it would report is said in one line
    with without_load_report() if new_head else contextlib.nullcontext():
        model, loaded = AutoModelForSequenceClassification.from_pretrained(path, num_labels=heads, dtype=dtype,
                                                                           output_loading_info=True)
    missing = sorted(key for key in loaded["missing_keys"] if not key.startswith("score."))
    unused = sorted(key for key in loaded["unexpected_keys"] if not key.startswith("lm_head."))
    if new_head and (missing or unused):
        log.warning("%s: weights missing from the checkpoint (newly initialised): %s; in it but unused: %s",
                    path, ", ".join(missing) or "none", ", ".join(unused) or "none")
    if pooling:
        model.config.reward_pooling = pooling
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ModelError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings only "
                         f"{model.get_input_embeddings().num_embeddings}: a mismatched tokenizer")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def check_layer_count(path: str, count: int):
    """Refuses, before anything is written, to keep more layers than the model at `path` has (0 keeps all)."""
    if not count:
        return
    total = AutoConfig.from_pretrained(path).num_hidden_layers
    if count > total:
        raise ModelError(f"{path}: reward.num_layers is {count} but the model has only {total} layers")


def keep_first_layers(model, count: int):
    """Cuts a new reward model's decoder to its first `count` layers: the final norm and the head then read that
    layer, and the model saved is that much smaller (so is PPO's critic, which starts as the reward model)."""
    total = model.config.num_hidden_layers
    found = [(name, child) for name, child in model.base_model.named_children()
             if isinstance(child, torch.nn.ModuleList) and len(child) == total]
    if not found:
        raise ModelError(f"reward.num_layers: no list of {total} layers in {type(model.base_model).__name__} to cut")
    name, stack = found[0]
    setattr(model.base_model, name, stack[:count])
    model.config.num_hidden_layers = count
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:count]


@contextlib.contextmanager
def without_load_report():
    def not_a_load_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(not_a_load_report)
    try:
        yield
    finally:
        logger.removeFilter(not_a_load_report)


def reward_record(path) -> dict:
    """What the reward stage stored for later stages (heads, scale, ties); empty for any other model folder."""
    return read_stage_record(path).get("reward", {})


def reward_heads(path) -> int:
    return reward_record(path).get("heads", 1)


def reward_pooling(model) -> str:
    return getattr(model.config, "reward_pooling", "last_token")


def answer_start(tokenizer, prompt: list[dict]) -> int:
    """Tokens before the answer: the prompt's conversation with the chat template's opening of the reply."""
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def score_head(model) -> torch.nn.Module:
    """The classifier's output layer, through any wrapper a launcher put around the model (DDP, FSDP)."""
    return next(module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] == "score")


def pooled_rewards(model, pooling: str, answer_mask: torch.Tensor | None = None, **inputs) -> torch.Tensor:
    """[rows, heads] rewards of a batch: the model's own last-token reading, or its head's outputs averaged over
    each row's answer tokens (`answer_mask`, 1 on them). The head's per-token outputs are caught as the model
    runs, so the forward pass stays the (possibly wrapped) model's own."""
    if pooling == "last_token":
        return model(**inputs).logits
    caught = []
    hook = score_head(model).register_forward_hook(lambda module, args, output: caught.append(output))
    try:
        model(**inputs)
    finally:
        hook.remove()
    per_token, weights = caught[-1].float(), answer_mask.float()[..., None]
    return (per_token * weights).sum(1) / weights.sum(1).clamp_min(1)


def answer_positions(attention_mask: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """1 on the real tokens at or after each row's answer start, counted in real tokens (any padding side)."""
    positions = attention_mask.cumsum(-1) - 1
    return attention_mask * (positions >= torch.tensor(starts, device=positions.device)[:, None])


def head_inputs(model, pooling: str, answer_mask: torch.Tensor | None = None, **inputs) -> torch.Tensor:
    """[rows, hidden] what the head reads from each row of a batch, pooled as `pooling` says: the hidden state at
    the last real token, or the mean over the answer's tokens (`answer_mask`). The head being linear, its output
    on these is the pooled reward."""
    caught = []
    hook = score_head(model).register_forward_hook(lambda module, args, output: caught.append(args[0]))
    try:
        model(**inputs)
    finally:
        hook.remove()
    hidden, attention = caught[-1].float(), inputs["attention_mask"]
    if pooling == "answer_mean":
        weights = answer_mask.float()
    else:  # the last real token, whichever side the padding is on
        last = (attention * torch.arange(attention.shape[1], device=attention.device)).argmax(-1)
        weights = torch.nn.functional.one_hot(last, attention.shape[1]).float()
    weights = weights[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


@torch.no_grad()
def read_conversations(model, tokenizer, conversations: list[list[dict]], read, width: int,
                       batch_size: int = 8) -> torch.Tensor:
    """[conversations, width]: `read(model, pooling, answer_mask, **batch)` on each whole conversation (prompt +
    response), pooled as the model was trained to. Each distinct conversation runs once, shortest first, so a
    batch pads little."""
    model.eval()
    pooling = reward_pooling(model)
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    starts = {text: answer_start(tokenizer, c[:-1]) if pooling == "answer_mean" else 0
              for text, c in zip(texts, conversations)}
    distinct = sorted(set(texts), key=lambda text: (len(text), text))  # the same batches in every process
    out = torch.zeros(len(distinct), width)
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start:start + batch_size]
        batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        answers = answer_positions(batch["attention_mask"], [starts[text] for text in chunk])
        out[start:start + batch_size] = read(model, pooling, answers, **batch).float().cpu()
    row = {text: i for i, text in enumerate(distinct)}
    return out[[row[text] for text in texts]]


def score_heads(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> torch.Tensor:
    """[conversations, heads] rewards of each whole conversation."""
    return read_conversations(model, tokenizer, conversations, pooled_rewards, model.config.num_labels, batch_size)


def pooled_features(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> torch.Tensor:
    """[conversations, hidden] what the head reads from each whole conversation."""
    return read_conversations(model, tokenizer, conversations, head_inputs, score_head(model).in_features,
                              batch_size)


def score(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """The reward of each conversation: the mean over the ensemble's heads."""
    return score_heads(model, tokenizer, conversations, batch_size).mean(-1).tolist()
