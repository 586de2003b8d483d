import itertools
import os
import subprocess
from pathlib import Path

import pytest

from preference_ui.loadtest import new_database, scratch_postgres

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
def tiny_reward_path(tmp_path_factory, tiny_model_path) -> Path:
    """The tiny model with a new score head, saved as a reward model (untrained, it still scores every answer
    differently)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf.reward_model import reward_tokenizer

    folder = tmp_path_factory.mktemp("tiny-reward")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1).save_pretrained(folder)
    reward_tokenizer(str(tiny_model_path)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from rlhf.models import load_tokenizer

    return load_tokenizer(str(tiny_model_path))


database_numbers = itertools.count()  # unique names for databases and test rows


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on 127.0.0.1. A missing server is a failure, never a skip."""
    try:
        with scratch_postgres() as server:
            yield server
    except RuntimeError as missing:
        pytest.fail(str(missing))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'labels.db'}"
    return new_database(request.getfixturevalue("postgres_server"), f"labels_{next(database_numbers)}")


def kill_when_saved(command: list[str], checkpoint: Path, timeout: float = 300, env: dict | None = None) -> None:
    """Runs a stage command and SIGKILLs it (with any processes it started) as soon as `checkpoint` has finished
    saving."""
    import signal
    import time

    import psutil

    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while not (checkpoint / "trainer_state.json").exists() and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    workers = psutil.Process(process.pid).children(recursive=True)  # a launcher's workers (torchrun's own session)
    process.send_signal(signal.SIGKILL)
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    process.wait()
    psutil.wait_procs(workers, timeout=30)
