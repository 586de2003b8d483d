"""Batched chat generation, shared by the stages that show or sample model answers."""
from dataclasses import dataclass

import torch


@dataclass
class Answer:
    text: str
    ids: list[int]  # the answer's tokens, through the stop token when it was reached
    ended: bool  # the model emitted its stop token within the length limit


@torch.no_grad()
def answer_prompts(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 8,
                   do_sample: bool = False, temperature: float = 1.0) -> list[Answer]:
    """Answers each conversation in `prompts` (lists of messages ending with the user). Prompts are left-padded
    so every row's last prompt token sits at the same position and generation continues from it."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample \
                else {"do_sample": False}
            output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    **sampling)
            answers += [cut_at_stop(row.tolist(), tokenizer) for row in output[:, batch["input_ids"].shape[1]:]]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def cut_at_stop(ids: list[int], tokenizer) -> Answer:
    """An answer's tokens through its first stop token (generation pads finished rows, with EOS where the pad
    token is EOS)."""
    stop = tokenizer.eos_token_id
    ended = stop in ids
    ids = ids[:ids.index(stop) + 1] if ended else ids
    return Answer(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, ended)


def generate_responses(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 8,
                       do_sample: bool = False, temperature: float = 1.0) -> list[str]:
    """The answers' texts (see answer_prompts)."""
    return [answer.text for answer in answer_prompts(model, tokenizer, prompts, max_new_tokens, batch_size,
                                                     do_sample, temperature)]
