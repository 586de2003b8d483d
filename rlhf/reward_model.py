"""Loading and scoring reward models: a sequence classifier with one output per ensemble head, read at the last
token that is not padding."""
import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from rlhf import models
from rlhf.errors import ModelError
from rlhf.runs import STAGE_RECORD

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


def load_reward_model(path: str, tokenizer, heads: int = 1, dtype=torch.float32):
    """A sequence classifier with `heads` outputs (1, or an ensemble) on the model at `path`. A published reward
    model keeps its own number of heads."""
    heads = reward_record(path).get("heads", heads)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=heads, dtype=dtype)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ModelError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings only "
                         f"{model.get_input_embeddings().num_embeddings}: a mismatched tokenizer")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def reward_record(path) -> dict:
    """What the reward stage stored for later stages (heads, scale, ties); empty for any other model folder."""
    record = Path(path) / STAGE_RECORD
    return json.loads(record.read_text()).get("reward", {}) if record.exists() else {}


def reward_heads(path) -> int:
    return reward_record(path).get("heads", 1)


@torch.no_grad()
def score_heads(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> torch.Tensor:
    """[conversations, heads] rewards of each whole conversation (prompt + response), read at its last real
    token. Each distinct conversation is scored once, shortest first, so a batch pads little."""
    model.eval()
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    distinct = sorted(set(texts), key=lambda text: (len(text), text))  # the same batches in every process
    out = torch.zeros(len(distinct), model.config.num_labels)
    for start in range(0, len(distinct), batch_size):
        batch = tokenizer(distinct[start:start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        out[start:start + batch_size] = model(**batch.to(model.device)).logits.float().cpu()
    row = {text: i for i, text in enumerate(distinct)}
    return out[[row[text] for text in texts]]


def score(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """The reward of each conversation: the mean over the ensemble's heads."""
    return score_heads(model, tokenizer, conversations, batch_size).mean(-1).tolist()
