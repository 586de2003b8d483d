import os
from pathlib import Path

import pytest

# Tests never reach the network or a tracking server; the tracking test turns wandb back on for itself.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """Configs name data by paths relative to the repository root, as the `rlhf` command is run from there."""
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from rlhf import models

    return models.prepare_bundled("tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from rlhf.models import load_tokenizer

    return load_tokenizer(str(tiny_model_path))
