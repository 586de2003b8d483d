"""Drive a running `rlhf label serve` with many concurrent labellers, then audit the store.

Used by the live-server test (through `gradio_client`) and by `bench/label_load.py` (through `BrowserLikeClient`,
which speaks Gradio's queue protocol the way the browser does, so latencies are the server's and not the polling
interval of `gradio_client`). Every response is made "good <n>" or "poor <n>" at random a/b positions, and each
simulated labeller votes for the side showing the good one; the audit then checks every stored vote against that
intent, which catches a side swap not undone as surely as a lost or duplicated vote.
"""
import contextlib
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx

from rlhf.store import Store

PASSWORD = "load-test-password"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def scratch_postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 from Debian's binaries, in a temporary folder; yields its URL
    (without a database name) and removes it afterwards."""
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not binaries:
        raise RuntimeError("PostgreSQL binaries not found under /usr/lib/postgresql: apt-get install postgresql "
                           "(.ci/run does)")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="rlhf-pg-"))
    root.chmod(0o755)
    if as_postgres:
        shutil.chown(root, "postgres", "postgres")
    port, pg_ctl = free_port(), str(binaries[-1] / "pg_ctl")
    try:  # a failed initdb or start leaves no folder behind either
        postgres_command("initdb", as_postgres + [str(binaries[-1] / "initdb"), "-D", str(root / "data"), "-A",
                                                  "trust", "-U", "postgres"])
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
        postgres_command("pg_ctl start", as_postgres + [pg_ctl, "-D", str(root / "data"), "-l", str(root / "log"),
                                                        "-w", "-o", options, "start"])
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(as_postgres + [pg_ctl, "-D", str(root / "data"), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def postgres_command(name: str, command: list[str]) -> None:
    """Runs one of PostgreSQL's tools; on failure, an error with what it said (CalledProcessError would not)."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()[-2000:]
        raise RuntimeError(f"{name} failed (exit {done.returncode}): {said}")


def new_database(server: str, name: str) -> str:
    """Creates an empty database on the server; its URL."""
    from sqlalchemy import create_engine, text

    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return f"{server}/{name}"


def prepare_store(url: str, labellers: int, comparisons: int, seed: int = 0) -> list[str]:
    """`labellers` users named load<i> and `comparisons` good-vs-poor pairs in batch "load"; returns the names."""
    store, rng = Store(url), random.Random(seed)
    names = [f"load{i:02d}" for i in range(labellers)]
    for name in names:
        store.add_user(name, "labeller", PASSWORD)
    store.add_user("load-admin", "admin", PASSWORD)
    for n in range(comparisons):
        prompt = store.add_prompt(f"load-{n}", "load", [{"role": "user", "content": f"Question {n}?"}])
        good, poor = (store.add_response(prompt, f"{quality} {n}", "load", {}) for quality in ("good", "poor"))
        a, b = (good, poor) if rng.random() < 0.5 else (poor, good)
        store.add_comparison(a, b, batch="load")
    store.engine.dispose()
    return names


def start_server(db_url: str, port: int, overlap: int, concurrency: int = 4, log: Path | None = None,
                 output_root: Path | None = None, options: tuple[str, ...] = ()):
    """`rlhf label serve` in a child process, with more `options` (e.g. --preferences.sign_in_lockout 3); returns it
    once the port answers (or raises with its output). Admin exports go under `output_root`/exports (default:
    runs/exports)."""
    command = [sys.executable, "-m", "pipeline.cli", "label", "serve", "--db", db_url, "--port", str(port),
               "--preferences.overlap", str(overlap), "--preferences.gold_rate", "0",
               "--preferences.concurrency", str(concurrency), *options]
    if output_root is not None:
        command += ["--run.output_root", str(output_root)]
    output = open(log, "w") if log else subprocess.DEVNULL
    server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if log:
        output.close()  # the child holds its own copy
    wait_for_port(server, port, log)
    return server


def wait_for_port(server: subprocess.Popen, port: int, log: Path | None = None, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {log.read_text() if log else ''}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    server.wait()
    raise RuntimeError(f"the server did not answer on port {port} within {seconds:.0f} s")


def stop_server(server) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def good_side(left: str, right: str) -> str:
    """The vote for the side showing "good <n>" (the app sends each side as HTML)."""
    return "vote_a" if ">good " in left else "vote_b"


def item_label(title: str) -> str:
    return title.removeprefix("### Item ")


class BrowserLikeClient:
    """Signs in, then calls app events the way the browser does: one POST for events outside Gradio's queue,
    otherwise POST queue/join and read the SSE stream. Inputs
    are passed as the browser sends them (None for a gr.State, which the server keeps per session), and outputs
    come back in full, state included."""

    def __init__(self, url: str, name: str, password: str = PASSWORD):
        self.http = httpx.Client(base_url=url, timeout=60)
        if self.http.post("/login", data={"username": name, "password": password}).status_code != 200:
            raise PermissionError(f"{name}: sign-in refused")
        config = self.http.get("/config").json()
        self.functions = {d["api_name"]: d for d in config["dependencies"] if d.get("api_name")}
        self.session = uuid.uuid4().hex
        # The standard library's client for the hot path: httpx costs the load generator more CPU per request
        # than the server spends, and on a small machine that would be measured as server latency.
        address = httpx.URL(url)
        self.connection = http.client.HTTPConnection(address.host, address.port, timeout=60)
        self.headers = {"Content-Type": "application/json",
                        "Cookie": "; ".join(f"{key}={value}" for key, value in self.http.cookies.items())}

    def close(self) -> None:
        self.connection.close()
        self.http.close()

    def call(self, api_name: str, *data):
        function = self.functions[api_name]
        body = {"data": list(data), "fn_index": function["id"], "session_hash": self.session, "event_data": None,
                "trigger_id": None}
        if function.get("queue") is False:  # answered in the response, as the app's labelling events are
            self.connection.request("POST", "/gradio_api/run/predict", json.dumps(body), self.headers)
            answered = self.connection.getresponse()
            text = answered.read()
            if answered.status != 200:
                raise RuntimeError(f"{api_name} failed: {answered.status} {text[:200]!r}")
            return json.loads(text)["data"]
        joined = self.http.post("/gradio_api/queue/join", json=body)
        joined.raise_for_status()
        with self.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": self.session}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    if not message.get("success", True):
                        raise RuntimeError(f"{api_name} failed: {message.get('output')}")
                    return message["output"]["data"]
        raise RuntimeError(f"{api_name}: the event stream ended without a result")


def audit(db_url: str, claimed: dict[str, list[str]]) -> dict:
    """Compares the votes the labellers saw accepted (by item label) with what the store holds."""
    store = Store(db_url)
    try:
        names = {user.id: user.name for user in store.users()}
        texts = {c["id"]: (c["a"], c["b"]) for c in store.comparisons("load")}
        votes = store.votes()
        ids = {store.item_label(comparison): comparison for comparison in texts}
    finally:  # its connections closed on an error too (a PostgreSQL server is dropped or stopped next)
        store.engine.dispose()
    if len(ids) != len(texts):
        raise RuntimeError("two comparisons share an item label")
    claimed = {name: [ids[label] for label in labels] for name, labels in claimed.items()}
    stored = Counter((names[vote.user_id], vote.comparison_id) for vote in votes)
    wanted = Counter((name, comparison) for name, ids in claimed.items() for comparison in ids)
    wrong_side = sum(vote.choice != ("a" if texts[vote.comparison_id][0].startswith("good") else "b") for vote in votes)
    per_item = Counter(comparison for _, comparison in stored)
    return {"stored": sum(stored.values()), "claimed": sum(wanted.values()),
            "lost": sum((wanted - stored).values()), "unexpected": sum((stored - wanted).values()),
            "duplicated": sum(count - 1 for count in stored.values() if count > 1),
            "wrong_side": wrong_side, "max_labellers_per_item": max(per_item.values(), default=0)}
