import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from preference_ui.loadtest import free_port

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


PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
database_numbers = itertools.count()  # unique names for databases and test rows


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on 127.0.0.1. A missing server is a failure, never a skip."""
    if not PG_BINS:
        pytest.fail("PostgreSQL binaries not found under /usr/lib/postgresql: apt-get install postgresql "
                    "(.ci/run does)")
    binaries = PG_BINS[-1]
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="rlhf-pg-"))
    root.chmod(0o755)
    if as_postgres:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    subprocess.run(as_postgres + [str(binaries / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U",
                                  "postgres"], check=True, capture_output=True)
    subprocess.run(as_postgres + [str(binaries / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w",
                                  "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(as_postgres + [str(binaries / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'labels.db'}"
    server = request.getfixturevalue("postgres_server")
    name = f"labels_{next(database_numbers)}"
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return f"{server}/{name}"


def kill_when_saved(command: list[str], checkpoint: Path, timeout: float = 300) -> None:
    """Runs a stage command and SIGKILLs it as soon as `checkpoint` has finished saving."""
    import signal
    import time

    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (checkpoint / "trainer_state.json").exists() and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
