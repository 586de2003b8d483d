import http.server
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from preference_ui.loadtest import free_port
from rlhf import tracking
from tests.conftest import REPO


def test_namespacing_follows_the_transformers_convention():
    assert tracking.namespaced({"loss": 1.0, "eval_loss": 2.0, "mean_token_accuracy": 0.5, "note": "x"}) == \
        {"train/loss": 1.0, "eval/loss": 2.0, "train/mean_token_accuracy": 0.5}


def test_non_main_ranks_and_none_track_nothing(tmp_path):
    assert tracking.start(["wandb", "trackio"], "p", "r", "sft", {}, tmp_path, is_main=False).backends == []
    assert tracking.start([], "p", "r", "sft", {}, tmp_path).backends == []


TRACK_ONE_STAGE = """
from pathlib import Path
from rlhf import tracking
tracker = tracking.start(["wandb", "trackio"], "rlhf-test", "run1", "sft", {"lr": 0.1}, Path("wb"))
tracker.log({"train/loss": 1.5}, step=1)
tracker.log_table("samples", ["prompt", "answer"], [["q", "a"]], step=1)
from rlhf.plots import pyplot, save_figure
figure, axes = pyplot().subplots()
axes.plot([0, 1], [1, 0])
save_figure(figure, Path("curve.png"))
tracker.log_images({"eval/curve": Path("curve.png")}, step=1)
tracker.use_artifact("run0-preferences", "dataset", Path("."))  # offline: named in the summary, no use recorded
run = tracker.backends[0].run
print("WANDB", run.group, run.job_type, run.name, "USES", list(run.summary["uses"]))
tracker.finish()
tracking.start(["trackio"], "rlhf-test", "run1", "reward", {}, Path("wb")).finish()  # a second stage, one process
"""


def test_wandb_goes_offline_without_login_and_trackio_records_locally(tmp_path):
    # A fresh process: trackio and wandb read HOME, TRACKIO_DIR and WANDB_MODE when first imported.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TRACKIO_DIR": str(tmp_path / "trackio"),
           "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}  # no WANDB_* variables, no ~/.netrc: not logged in
    result = subprocess.run([sys.executable, "-c", TRACK_ONE_STAGE], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WANDB run1 sft run1-sft USES ['run0-preferences']" in result.stdout
    # one line each from wandb (offline) and trackio (local), not their banners and closing tables
    said = result.stdout + result.stderr
    [offline_run] = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    assert [line for line in said.splitlines() if line.startswith(("wandb:", "*"))] == [
        f"wandb: offline (not logged in); upload later with: wandb sync {offline_run.relative_to(tmp_path)}"]
    assert said.count(f"trackio: recorded in {tmp_path / 'trackio'}; dashboard with: trackio show --project "
                      "rlhf-test") == 2
    assert "Run summary" not in said and "Trackio project initialized" not in said
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    [image] = list((tmp_path / "wb" / "wandb").glob("offline-run-*/files/media/images/eval/curve_*.png"))
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [database] = list((tmp_path / "trackio").rglob("rlhf-test*.db"))
    with sqlite3.connect(database) as db:
        tables = [name for (name,) in db.execute("select name from sqlite_master where type='table'")]
        dump = " ".join(str(row) for table in tables for row in db.execute(f"select * from {table}"))
    assert "run1-sft" in dump and "train/loss" in dump and "eval/curve" in dump
    assert list((tmp_path / "trackio").rglob("*.png"))


TRACK_THROUGH_TRACKER_FAILURES = """
from pathlib import Path
from rlhf import tracking

class ServiceGone:  # a tracker whose service dies during the stage
    name = "gone"
    def log(self, metrics, step):
        raise ConnectionError("connection reset\\nby peer")
    def finish(self, failed=False):
        raise AssertionError("a tracker left out is not finished")

def unwritable(*args):
    raise PermissionError("read-only file system")

tracking.BACKENDS.update(gone=lambda *args: ServiceGone(), unwritable=unwritable)
tracker = tracking.start(["unwritable", "wandb", "gone"], "rlhf-test", "run1", "sft", {}, Path("wb"))
tracker.log({"train/loss": 1.5}, step=1)
tracker.log({"train/loss": 1.2}, step=2)
run = tracker.backends[0].run
tracker.finish(failed=True)
print("LEFT", [backend.name for backend in tracker.backends], "EXIT", run._exit_code)
"""


def test_a_tracker_that_fails_is_said_once_and_left_out_and_a_failed_stage_finishes_its_run_as_failed(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TRACKIO_DIR": str(tmp_path / "trackio"),
           "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", TRACK_THROUGH_TRACKER_FAILURES], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "unwritable: could not start (PermissionError: read-only file system); the stage goes on without " \
           "unwritable" in lines
    assert [line for line in lines if line.startswith("gone:")] == [
        "gone: log failed (ConnectionError: connection reset); the stage goes on without gone"]
    assert lines[-1] == "LEFT [] EXIT 1"  # wandb kept logging, and was told the stage failed


def test_inputs_published_by_earlier_stages_are_used_as_their_artifacts(tmp_path):
    from rlhf.stage import used_artifacts

    run = tmp_path / "myrun"
    for stage in ("sft", "preferences"):
        (run / stage).mkdir(parents=True)
        (run / stage / "stage.json").write_text(json.dumps({"stage": stage}))
    (run / "preferences" / "export.json").write_text(json.dumps({"content_hash": "abc"}))
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "export.json").write_text(json.dumps({"content_hash": "def"}))
    inputs = {"model": str(run / "sft"), "preferences": str(run / "preferences"), "other": str(tmp_path / "export"),
              "prompts": "data/rl_prompts.jsonl", "hub": "org/model"}
    assert used_artifacts(inputs) == [("myrun-sft", "model", str(run / "sft")),
                                      ("myrun-preferences", "dataset", str(run / "preferences")),
                                      ("labels-def", "dataset", str(tmp_path / "export"))]

def test_a_netrc_entry_counts_as_logged_in_for_the_server_wandb_is_set_to_use(tmp_path, monkeypatch):
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine wandb.example.org\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert tracking.wandb_logged_in("https://wandb.example.org")  # a self-hosted server (WANDB_BASE_URL)
    assert not tracking.wandb_logged_in("https://api.wandb.ai")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.wandb_logged_in("https://api.wandb.ai")


TRACK_WITHOUT_THE_SERVER = """
from pathlib import Path
from rlhf import tracking
tracker = tracking.start(["wandb"], "rlhf-test", "run1", "sft", {"lr": 0.1}, Path("wb"))
tracker.log({"train/loss": 1.5}, step=1)
tracker.finish()
print("FINISHED")
"""


def track_without_the_server(tmp_path, server: str) -> tuple[str, Path]:
    """One stage's tracking with a wandb key and `server` as wandb's: (the one `wandb: offline` line, the run)."""
    tmp_path.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": server, "WANDB_INIT_TIMEOUT": "3"}
    result = subprocess.run([sys.executable, "-c", TRACK_WITHOUT_THE_SERVER], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "FINISHED" in result.stdout, result.stderr[-3000:]
    [offline_run] = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("run-*.wandb"))
    [line] = [line for line in result.stdout.splitlines() if line.startswith("wandb: offline")]
    assert line.endswith(f"upload later with: wandb sync {offline_run.relative_to(tmp_path)}"), line
    return line, offline_run


def test_wandb_logged_in_but_out_of_reach_tracks_offline(tmp_path):
    """A key, and no server: a refused port on loopback goes offline at once (no network at all, likewise); a
    port that opens but answers nothing wandb understands (a firewall, a server down) goes offline after wandb's
    own wait (WANDB_INIT_TIMEOUT, 3 s here), as does a server that refuses the key (401). (With WANDB_MODE=online
    set, the error is raised instead: not tested, another ~15 s of wandb's retries.)"""
    refused = f"http://127.0.0.1:{free_port()}"
    line, _ = track_without_the_server(tmp_path / "refused", refused)
    assert line.startswith(f"wandb: offline (could not reach {refused}: [Errno 111] Connection refused)"), line

    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=close_each_connection, args=(listener,), daemon=True).start()
    silent = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        line, _ = track_without_the_server(tmp_path / "closing", silent)
    finally:
        listener.close()
    assert line.startswith(f"wandb: offline (could not start online at {silent}: "), line
    assert "Connection refused" not in line, line

    refusing = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefuseEveryKey)  # a revoked key
    threading.Thread(target=refusing.serve_forever, daemon=True).start()
    server = f"http://127.0.0.1:{refusing.server_address[1]}"
    try:
        line, _ = track_without_the_server(tmp_path / "refusing", server)
    finally:
        refusing.shutdown()
    assert line.startswith(f"wandb: offline (could not start online at {server}: user is not logged in)"), line


class RefuseEveryKey(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"errors": [{"message": "user is not logged in"}]}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args):
        pass


def close_each_connection(listener: socket.socket) -> None:
    """Accepts each connection and closes it at once, until the listener is closed."""
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        connection.close()


def test_a_stage_that_fails_finishes_its_trackers_as_failed(tmp_path, monkeypatch):
    import pytest

    from rlhf.config import RunConfig
    from rlhf.stage import running_stage
    from sft.config import SFTStageConfig

    finished = []

    class Recording:
        name = "recording"

        def use_artifact(self, *args) -> None:
            pass

        def finish(self, failed: bool = False) -> None:
            finished.append(failed)

    monkeypatch.setattr(tracking, "start", lambda *args, **kwargs: tracking.Tracker([Recording()]))
    run, config = RunConfig(name="r", output_root=str(tmp_path)), SFTStageConfig(output_dir=str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match="out of memory"):
        with running_stage(run, "sft", config, {}):
            raise RuntimeError("out of memory")
    with running_stage(run, "sft", config, {}):
        pass
    assert finished == [True, False]
