"""Batched chat generation, shared by the stages that show or sample model answers."""
from dataclasses import dataclass

import torch
from tqdm import tqdm

from rlhf.decoding import decode


@dataclass
class Answer:
    text: str
    ids: list[int]  # the answer's tokens, through the stop token when it was reached
    ended: bool  # the model emitted its stop token within the length limit


@torch.no_grad()
def answer_prompts(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 8,
                   do_sample: bool = False, temperature: float = 1.0, progress: str = "") -> list[Answer]:
    """Answers each conversation in `prompts` (lists of messages ending with the user), in their order. Prompts
    are batched by token length, longest first: every row of a batch is left-padded to the batch's longest
    prompt and each pad token costs a full prefill position, so batching like with like saves most of that
    (in random batches of 64 our prompts were padded to 2.5 times their length). Decoded by our loop
    (rlhf/decoding.py): k copies of one prompt share a prefill, finished rows leave the batch. `progress`: a bar's
    title."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    encoded = [tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    answers: list[Answer | None] = [None] * len(prompts)
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=progress, unit="batch", disable=not progress):
            rows = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt").to(model.device)
            decoded = decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens,
                             tokenizer.eos_token_id, tokenizer.pad_token_id, temperature if do_sample else 1.0,
                             greedy=not do_sample)
            for i, row in zip(rows, decoded.tokens):
                answers[i] = cut_at_stop(row.tolist(), tokenizer)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def cut_at_stop(ids: list[int], tokenizer) -> Answer:
    """An answer's tokens through its first stop token (generation pads finished rows, with EOS where the pad
    token is EOS). Its text without NUL characters, which a byte-level tokenizer can decode: PostgreSQL's text
    columns refuse them, and so do our data files."""
    stop = tokenizer.eos_token_id
    ended = stop in ids
    ids = ids[:ids.index(stop) + 1] if ended else ids
    return Answer(tokenizer.decode(ids, skip_special_tokens=True).replace("\x00", "").strip(), ids, ended)


def generate_responses(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 8,
                       do_sample: bool = False, temperature: float = 1.0, progress: str = "") -> list[str]:
    """The answers' texts (see answer_prompts)."""
    return [answer.text for answer in answer_prompts(model, tokenizer, prompts, max_new_tokens, batch_size,
                                                     do_sample, temperature, progress)]
