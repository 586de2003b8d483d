"""Run directories: `runs/<name>/<stage>/` for each stage's outputs and `runs/<name>/manifest.json` for the record.
Online rounds after the first keep their stages in `runs/<name>/round-<r>/<stage>/`, recorded in the manifest as
`round-<r>/<stage>`; the SFT model is shared by every round (`RunDir.key`).

A stage works in `runs/<name>/.<stage>.partial/` (checkpoints live there, so a killed stage can resume) and
publishes its finished outputs by renaming a complete folder to `runs/<name>/<stage>/`: a folder under that name
is always whole. Every JSON file here is written to a temporary file and renamed into place.
"""
import contextlib
import ctypes
import errno
import fcntl
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from rlhf.errors import UserError

MANIFEST = "manifest.json"
STAGE_RECORD = "stage.json"
SHARED_STAGES = ("sft",)  # made once, read by every online round


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates files readable by their owner only
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def file_lock(path):
    """An exclusive lock held on `path`.lock, across processes on this machine."""
    lock_path = Path(f"{path}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# How fast a stage ran, on how many processes and where it resumed from: the manifest and the trackers keep them,
# the files a stage publishes do not. A later stage reads the folder by its content hash: with them, a rerun to the
# same weights looked like a new model (a preferences batch drawn from it was refused as drawn from another).
HOW_IT_RAN = re.compile(r"(_per_s|_per_second|_step_s|_generate_s|_runtime)$|^timing/|^eps$|^processes$"
                        r"|^resumed_from_(step|update)$")


def results_only(metrics: dict) -> dict:
    """`metrics` without how the stage ran (HOW_IT_RAN), for the files it publishes."""
    return {name: value for name, value in metrics.items() if not HOW_IT_RAN.search(name)}


def stage_lock(run: "RunDir", stage: str):
    """Held while a stage runs, so a second `rlhf <stage>` on the same run stops at once instead of deleting
    the first one's checkpoints."""
    return held_or_refused(run.path / f".{run.label(stage)}.lock",
                           f"stage '{run.key(stage)}' of run '{run.name}' is already running in another process")


def run_lock(run: "RunDir"):
    """Held by `rlhf run` from its first stage to its last: a second `rlhf run` of the same run stops at once
    (each deciding stage by stage what was up to date, the two took turns republishing each other's stages)."""
    return held_or_refused(run.path / ".run.lock",
                           f"run '{run.name}' in {run.root} is already being run by another `rlhf run`")


@contextlib.contextmanager
def held_or_refused(path: Path, busy: str):
    """The lock file `path` held by this process inside the block; UserError(`busy`) at once when another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def hash_config(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def hash_path(path) -> str:
    """Content hash of a file, or of a folder's files and their relative paths."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def work_key(config_hash: str, hashes: dict) -> str:
    """One key for a stage's config and the hashes of the inputs it read: what its checkpoints were made from."""
    return hash_config({"config": config_hash, "inputs": hashes})


def input_hashes(inputs: dict) -> dict:
    """Content hashes of a stage's inputs that are paths on this machine; other values (a hub id) as they are."""
    return {name: hash_path(path) if Path(path).exists() else str(path) for name, path in inputs.items()}


@functools.cache  # (asked once per stage skipped or recorded; the code does not change under a running process)
def code_version() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version
        return f"rlhf-{version('rlhf')}"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_stage_record(folder) -> dict:
    """What a stage wrote into the folder it published (stage.json); empty for any other folder."""
    record = Path(folder) / STAGE_RECORD
    return json.loads(record.read_text()) if record.is_file() else {}


def stage_key(stage: str, round: int) -> str:
    """A stage's folder under the run and its manifest entry: `stage` in round 1 (and for the SFT model, which
    every round shares), else `round-<r>/stage`."""
    return stage if round == 1 or stage in SHARED_STAGES else f"round-{round}/{stage}"


# 2: stages record their gold file, label store and judges' code too (an entry of 1 recorded fewer inputs); 3: the
# preferences stage records the AI labeller's constitution and model folder
INPUTS_VERSION = 3
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


# wandb's artifact names hold 128 characters: `<run>-<stage>`, `<run>-round-<r>-preferences` with room for r
RUN_NAME_LENGTH = 100


def check_run_name(name: str) -> None:
    """A folder name that is also a valid tracker artifact name (`<run>-<stage>`: wandb refuses spaces, ':', '+')."""
    if not RUN_NAME.fullmatch(name or ""):
        raise ValueError(f"name must be a plain folder name (letters, digits, '.', '_', '-'; not starting with "
                         f"'.'), got '{name}'")
    if len(name) > RUN_NAME_LENGTH:
        raise ValueError(f"name must be at most {RUN_NAME_LENGTH} characters (the trackers name each stage's "
                         f"artifact `<name>-<stage>` in 128), got {len(name)}")


class RunDir:
    """A run's folder, seen from one online round (1: the first, whose stages sit at the top)."""

    def __init__(self, root, name: str, round: int = 1):
        check_run_name(name)
        self.root, self.name, self.round = root, name, round
        self.path = Path(root) / name

    def key(self, stage: str) -> str:
        return stage_key(stage, self.round)

    def label(self, stage: str) -> str:
        """The key as one name (tracked runs, artifacts, locks): `ppo`, `round-2-ppo`."""
        return self.key(stage).replace("/", "-")

    def in_round(self, round: int) -> "RunDir":
        return RunDir(self.root, self.name, round)

    def stage_path(self, stage: str) -> Path:
        return self.path / self.key(stage)

    def partial_path(self, stage: str) -> Path:
        final = self.stage_path(stage)
        return final.parent / f".{final.name}.partial"

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def read_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"run": self.name, "created": now(), "stages": {}}
        return json.loads(self.manifest_path.read_text())

    def stage_entry(self, stage: str) -> dict | None:
        return self.read_manifest()["stages"].get(self.key(stage))

    def record(self, stage: str, replace: bool = False, **entry) -> dict:
        """Merges `entry` into the stage's manifest entry, or with `replace` writes it whole (under a lock: stages
        may run side by side)."""
        with file_lock(self.manifest_path):
            manifest = self.read_manifest()
            key = self.key(stage)
            merged = entry if replace else {**manifest["stages"].get(key, {}), **entry}
            manifest["stages"][key] = merged
            manifest["updated"] = now()
            atomic_write_json(self.manifest_path, manifest)
        return merged

    def publish(self, stage: str, finished: Path) -> Path:
        """Renames the complete folder `finished` to `runs/<name>/<stage>`, replacing an older one whole: in one
        step where the system can exchange two folders (Linux), else by two renames."""
        final = self.stage_path(stage)
        final.parent.mkdir(parents=True, exist_ok=True)
        for leftover in final.parent.glob(f".{final.name}.old-*"):  # from a publish killed between its two renames
            shutil.rmtree(leftover, ignore_errors=True)
        if final.exists() and exchange_folders(finished, final):
            shutil.rmtree(finished, ignore_errors=True)  # it holds the older folder now
            return final
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{int(time.time() * 1000)}"
            os.replace(final, old)
        os.replace(finished, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final


def exchange_folders(first: Path, second: Path) -> bool:
    """Swaps two folders at once (renameat2 with RENAME_EXCHANGE): a reader, or a kill, finds one or the other,
    never neither. False where the C library or the filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_current_folder, rename_exchange = -100, 2
    if renameat2(at_current_folder, os.fsencode(first), at_current_folder, os.fsencode(second), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(second))


def remove_folder(folder: Path) -> None:
    """Removes `folder` by renaming it aside first: a removal cut short leaves no half-deleted folder under its
    name (a checkpoint whose weights are gone but whose trainer_state.json is not would pass for a complete one).
    What an earlier removal cut short left aside goes too."""
    folder = Path(folder)
    for leftover in folder.parent.glob(f"{glob.escape(folder.name)}.removing-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if not folder.exists():
        return
    aside = folder.with_name(f"{folder.name}.removing-{uuid.uuid4().hex[:8]}")
    os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


class StageRecord:
    """Times a stage and writes its manifest entry: `running` at start, then `done` or `failed`. A stage already
    done keeps its record (its published folder is still the stage's output) until a new attempt is done too:
    meanwhile the attempt, running or failed, is recorded under the entry's `attempt`."""

    def __init__(self, run: RunDir, stage: str, config: dict, inputs: dict):
        self.run, self.stage = run, stage
        self.config_hash = hash_config(config)
        self.inputs = inputs
        self.input_hashes = input_hashes(inputs)
        self.work_key = work_key(self.config_hash, self.input_hashes)
        self.started = time.time()
        self.attempt = {"status": "running", "config_hash": self.config_hash, "input_hashes": self.input_hashes,
                        "inputs": {k: str(v) for k, v in inputs.items()}, "inputs_version": INPUTS_VERSION,
                        "code_version": code_version(),
                        "started": now(), "config": config}
        self.record_attempt(self.attempt)

    def done(self, outputs: dict, metrics: dict, timings: dict | None = None) -> dict:
        return self.run.record(self.stage, replace=True, **{
            **self.attempt, "status": "done", "finished": now(), "outputs": {k: str(v) for k, v in outputs.items()},
            "metrics": metrics, "timings": {"total_s": round(time.time() - self.started, 2), **(timings or {})}})

    def publish(self, staged: Path, partial: Path, metrics: dict, train_seconds: float,
                extra: dict | None = None) -> Path:
        """Writes `stage.json` (with `extra`, what later stages read) into the complete folder `staged`, renames
        it to `runs/<name>/<stage>`, removes the stage's working folder, and records the stage done."""
        outputs = {"model": self.run.stage_path(self.stage)}
        atomic_write_json(staged / STAGE_RECORD, {"stage": self.stage, "round": self.run.round,
                                                  "artifact": f"{self.run.name}-{self.run.label(self.stage)}",
                                                  "config_hash": self.config_hash,
                                                  "input_hashes": self.input_hashes, "metrics": results_only(metrics),
                                                  "outputs": {k: str(v) for k, v in outputs.items()},
                                                  **(extra or {})})
        final = self.run.publish(self.stage, staged)
        self.done(outputs, metrics, {"train_s": round(train_seconds, 2)})  # before the working folder goes: a stop
        remove_folder(partial)  # while it is removed leaves the stage done, not failed beside a complete folder
        return final

    def failed(self, error: BaseException) -> None:
        failure = {**self.attempt, "status": "failed", "finished": now(), "error": f"{type(error).__name__}: {error}",
                   "timings": {"total_s": round(time.time() - self.started, 2)}}
        self.record_attempt(failure)

    def record_attempt(self, attempt: dict) -> None:
        """The stage's entry, or beside a done one (this attempt's own, or an earlier one) its `attempt`."""
        current = self.run.stage_entry(self.stage) or {}
        if current.get("status") == "done":
            self.run.record(self.stage, attempt=attempt)
        else:
            self.run.record(self.stage, replace=True, **attempt)


def run_report(run_dir: RunDir) -> str | None:
    """The run's report.md (beside its stages, links into eval/), written from the published eval's own: by the
    eval stage once it has published, and again by `rlhf run` at its end (an eval killed after publishing and
    before writing it is up to date for `rlhf run`). None before any eval is published."""
    published = run_dir.stage_path("eval") / "report.md"
    if not published.exists():
        return None
    text = published.read_text()
    atomic_write_text(run_dir.path / "report.md", text.replace("](", f"]({run_dir.key('eval')}/"))
    return text
