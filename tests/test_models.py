import json
import subprocess
import sys

import pytest

from rlhf import models
from rlhf.errors import ModelError
from tests.conftest import REPO

PREPARE = ("import logging; logging.basicConfig(level=logging.INFO); from rlhf import models; "
           "print(models.prepare_bundled('tiny-llama'))")


def test_two_processes_preparing_at_once_convert_once(tmp_path):
    env = {"RLHF_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    paths = {stdout.strip() for stdout, _ in outputs}
    assert all(p.returncode == 0 for p in procs)
    # one of them converted; the other waited on the lock and found the folder ready
    assert sum(stderr.count("preparing bundled model tiny-llama") for _, stderr in outputs) == 1, outputs
    assert paths == {str(tmp_path / "models" / "tiny-llama")}
    folder = tmp_path / "models" / "tiny-llama"
    assert json.loads((folder / models.READY_MARKER).read_text())["version"] == models.BUNDLED["tiny-llama"].version
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-llama", "tiny-llama.lock"]
    assert (folder / "model.safetensors").exists() and (folder / "chat_template.jinja").exists()


def test_loaded_tiny_model_generates_with_its_chat_template(tiny_model_path):
    model, tokenizer = models.load_causal_lm(str(tiny_model_path))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == model.generation_config.pad_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    prompt = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert output.shape == (1, prompt["input_ids"].shape[1] + 5)


def test_offline_hub_id_names_the_bundled_model():
    with pytest.raises(ModelError) as caught:
        models.resolve("someone/some-model")
    assert "Offline, use the bundled model" in str(caught.value) and "smollm2-135m-instruct" in str(caught.value)


def test_local_folders_must_hold_a_model(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        models.resolve(str(tmp_path))
    with pytest.raises(ModelError, match="not found"):
        models.resolve(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="unknown bundled model"):
        models.prepare_bundled("gpt-9")


def test_models_list_command(tiny_model_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "models", "list"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    assert "smollm2-135m-instruct" in result.stdout and "tiny-llama               prepared" in result.stdout


def test_a_damaged_marker_or_a_killed_preparations_folder_is_built_again_and_cleared(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    folder = models.prepare_bundled("tiny-llama")
    (folder / models.READY_MARKER).write_text('{"model": "tiny-lla')  # cut short
    leftover = tmp_path / "models" / ".tiny-llama.k1lled"  # a staging folder a SIGKILL left
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    assert not models.is_prepared("tiny-llama")
    assert models.prepare_bundled("tiny-llama") == folder and models.is_prepared("tiny-llama")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-llama", "tiny-llama.lock"]
