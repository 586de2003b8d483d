"""The real bundled model: prepared from its GGUF, chat template intact, one SFT step through the stage."""
import pytest
import torch
from safetensors.torch import load_file

from rlhf import models
from rlhf.config import RunConfig, load_config
from rlhf.generation import generate_responses
from sft.config import SFTStageConfig
from sft.train import main, tokenize_conversation
from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_path():
    return models.prepare_bundled("smollm2-135m-instruct")


def test_bundled_tokenizer_keeps_the_chat_template_and_pad_equals_eos(smollm2_path):
    tokenizer = models.load_tokenizer(str(smollm2_path))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversation = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A pear."}]
    encoded = tokenize_conversation(tokenizer, conversation)
    kept = [t for t, bit in zip(encoded["input_ids"], encoded["assistant_masks"]) if bit]
    # The template adds a default system prompt; none of it, nor the user turn, carries loss.
    assert tokenizer.decode(kept) == "A pear.<|im_end|>"
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(encoded["input_ids"])


def test_one_sft_step_on_smollm2_changes_the_weights_and_the_model_still_answers(tmp_path, smollm2_path):
    sections = load_config(REPO / "configs/default.yaml", [
        f"--run.output_root={tmp_path}", "--run.name=slow", "--run.tracking=none", "--sft.max_steps=1",
        "--sft.warmup_steps=0", "--sft.per_device_train_batch_size=2", "--sft.max_length=128",
        "--sft.eval_fraction=0.02",
        "--sft.num_samples=1", "--sft.sample_max_new_tokens=8", "--sft.save_strategy=no"],
        {"run": RunConfig, "sft": SFTStageConfig})
    metrics = main(sections["sft"], sections["run"])
    assert metrics["global_step"] == 1 and metrics["real_tokens"] > 100
    assert 0 < metrics["eval_loss"] < 10 and torch.isfinite(torch.tensor(metrics["train_loss"]))

    out = tmp_path / "slow" / "sft"
    base, trained = load_file(smollm2_path / "model.safetensors"), load_file(out / "model.safetensors")
    assert base.keys() == trained.keys()
    assert any(not torch.equal(base[name], trained[name]) for name in base)
    model, tokenizer = models.load_causal_lm(str(out))
    [answer] = generate_responses(model, tokenizer, [[{"role": "user", "content": "What is 2 + 2?"}]], 8)
    assert answer.strip()
