import sqlite3

from rlhf import tracking


def test_namespacing_follows_the_transformers_convention():
    assert tracking.namespaced({"loss": 1.0, "eval_loss": 2.0, "mean_token_accuracy": 0.5, "note": "x"}) == \
        {"train/loss": 1.0, "eval/loss": 2.0, "train/mean_token_accuracy": 0.5}


def test_non_main_ranks_and_none_track_nothing(tmp_path):
    assert tracking.start(["wandb", "trackio"], "p", "r", "sft", {}, tmp_path, is_main=False).backends == []
    assert tracking.start([], "p", "r", "sft", {}, tmp_path).backends == []


def test_wandb_goes_offline_without_login_and_trackio_records_locally(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    import trackio.utils  # trackio reads TRACKIO_DIR at import; point its storage at the test folder
    monkeypatch.setattr(trackio.utils, "TRACKIO_DIR", tmp_path / "trackio")

    tracker = tracking.start(["wandb", "trackio"], "rlhf-test", "run1", "sft", {"lr": 0.1}, tmp_path / "wb")
    tracker.log({"train/loss": 1.5}, step=1)
    tracker.log_table("samples", ["prompt", "answer"], [["q", "a"]], step=1)
    wandb_run = tracker.backends[0].run
    assert (wandb_run.group, wandb_run.job_type, wandb_run.name) == ("run1", "sft", "run1-sft")
    tracker.finish()

    assert "wandb sync" in capsys.readouterr().out
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    [database] = list((tmp_path / "trackio").rglob("rlhf-test*.db"))
    with sqlite3.connect(database) as db:
        tables = [name for (name,) in db.execute("select name from sqlite_master where type='table'")]
        dump = " ".join(str(row) for table in tables for row in db.execute(f"select * from {table}"))
    assert "run1-sft" in dump and "train/loss" in dump
