"""Experiment tracking: wandb, trackio, both, or none, behind one small `Tracker`.

Naming, the same for every stage: one wandb group and one trackio group per run (the run name), one tracked run
per stage named `<run>-<stage>` (online rounds after the first: `<run>-round-<r>-<stage>`) with `job_type` = stage,
the whole stage config logged. Trainer metrics keep
TRL's names under `train/` and `eval/` (as transformers' own wandb integration writes them).
wandb runs online when logged in and offline otherwise (then `wandb sync` uploads later). On non-main ranks,
and with `tracking: none`, every call is a no-op. A tracker that fails (its service gone, its folder unwritable) is
said in one line and left out for the rest of the stage: a tracker is no reason to stop a stage (unless
WANDB_MODE=online asked for wandb's server and it cannot start). A stage that fails finishes its wandb run as failed.
"""
import contextlib
import io
import logging
import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from transformers import TrainerCallback

log = logging.getLogger(__name__)


def wandb_server(wandb) -> str:
    """The server wandb sends runs to: WANDB_BASE_URL, else wandb's own default."""
    return os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url


def wandb_logged_in(server: str) -> bool:
    """An API key or identity token in the environment, or (what `wandb login` writes) a netrc entry for the
    server's host; the NETRC variable names another netrc file, as for wandb."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(urlparse(server).hostname) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def unreachable(server: str) -> str | None:
    """Why no connection to the server opens within 5 s (no network, no such host, a refused port); None when one
    does, or when a proxy is set (wandb connects through it, which this does not try)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                             "all_proxy")):
        return None
    parts = urlparse(server)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=5).close()
    except (OSError, ValueError) as error:
        return f"could not reach {server}: {error}"
    return None


class WandbBackend:
    name = "wandb"

    def __init__(self, project: str, group: str, stage: str, config: dict, directory: Path, label: str):
        import wandb

        server, chosen = wandb_server(wandb), os.environ.get("WANDB_MODE")
        mode = chosen or ("online" if wandb_logged_in(server) else "offline")
        reason = f"WANDB_MODE={chosen}" if chosen else "not logged in"
        cut_off = unreachable(server) if mode == "online" and not chosen else None
        if cut_off:  # no network at all: offline at once, not after wandb's retries
            mode, reason = "offline", cut_off
        directory.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        try:
            self.run = self.started(project, group, stage, config, directory, label, mode)
        except wandb.errors.CommError as error:
            if chosen:  # WANDB_MODE=online asked for the server: no quiet fallback
                raise
            # logged in, the server's port open, but wandb's requests fail (a firewall, a server down, a key it
            # refuses): a tracker is no reason to stop a stage, so the run is kept offline, to upload later
            reason = f"could not start online at {server}: {first_line(error)}"
            mode = "offline"
            self.run = self.started(project, group, stage, config, directory, label, mode)
        self.online = mode in ("online", "run")
        if mode == "offline":
            print(f"wandb: offline ({reason}); upload later with: wandb sync {Path(self.run.dir).parent}",
                  flush=True)

    def started(self, project: str, group: str, stage: str, config: dict, directory: Path, label: str, mode: str):
        # offline, wandb's banner and closing summary and history (some 35 lines a stage) are left out: the stage
        # prints its own results, and the line above says where the run is and how to upload it
        return self.wandb.init(project=project, group=group, job_type=stage, name=f"{group}-{label}",
                               config=config, dir=str(directory), mode=mode, reinit="finish_previous",
                               settings=self.wandb.Settings(silent=mode == "offline"))

    def log(self, metrics: dict, step: int | None) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None) -> None:
        self.run.log({key: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def log_images(self, images: dict[str, Path], step: int | None) -> None:
        self.run.log({key: self.wandb.Image(str(path)) for key, path in images.items()}, step=step)

    def artifact(self, name: str, kind: str, path: Path):
        # A reference records lineage (path and checksums) without copying model weights into wandb's folder.
        artifact = self.wandb.Artifact(name, type=kind)
        artifact.add_reference(Path(path).resolve().as_uri())
        return artifact

    def log_artifact(self, name: str, kind: str, path: Path) -> None:
        self.run.log_artifact(self.artifact(name, kind, path))

    def use_artifact(self, name: str, kind: str, path: Path) -> None:
        """Online, the input joins the lineage graph (the same reference gives the same artifact version);
        wandb cannot record a use offline, so there the run's summary names its inputs (`uses`)."""
        uses = list(self.run.summary.get("uses", [])) + [name]
        self.run.summary["uses"] = uses
        if self.online:
            self.run.use_artifact(self.artifact(name, kind, path))

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class TrackioBackend:
    name = "trackio"

    def __init__(self, project: str, group: str, stage: str, config: dict, directory: Path, label: str):
        import trackio

        self.trackio = trackio
        with contextlib.redirect_stdout(io.StringIO()) as banner:
            self.run = trackio.init(project=project, name=f"{group}-{label}", group=group,
                                    config={**config, "job_type": stage}, embed=False)
        self.local = not (os.environ.get("TRACKIO_SPACE_ID") or os.environ.get("TRACKIO_SERVER_URL"))
        # trackio's banner is up to 8 lines a stage; logging locally, one line says where and how to look.
        # Logging to a Space or a server, what it says is passed on as it is.
        if self.local:
            print(f"trackio: recorded in {trackio.utils.TRACKIO_DIR}; dashboard with: trackio show --project {project}",
                  flush=True)
        else:
            print(banner.getvalue(), end="", flush=True)

    def log(self, metrics: dict, step: int | None) -> None:
        self.trackio.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None) -> None:
        self.trackio.log({key: self.trackio.Table(columns=columns, data=rows)}, step=step)

    def log_images(self, images: dict[str, Path], step: int | None) -> None:
        self.trackio.log({key: self.trackio.Image(str(path)) for key, path in images.items()}, step=step)

    def log_artifact(self, name: str, kind: str, path: Path) -> None:
        pass  # trackio keeps metrics and tables; lineage lives in the run manifest and in wandb

    def use_artifact(self, name: str, kind: str, path: Path) -> None:
        pass

    def finish(self, failed: bool = False) -> None:  # (trackio keeps no run status)
        with contextlib.redirect_stdout(io.StringIO()) if self.local else contextlib.nullcontext():
            self.trackio.finish()


BACKENDS = {"wandb": WandbBackend, "trackio": TrackioBackend}


class Tracker:
    def __init__(self, backends: list):
        self.backends = list(backends)

    def each(self, call: str, *args) -> None:
        """`call` on every backend; one that raises is said and left out from then on."""
        for backend in list(self.backends):
            try:
                getattr(backend, call)(*args)
            except Exception as error:  # (its service, files or network: whatever a tracker meets)
                self.backends.remove(backend)
                name = getattr(backend, "name", type(backend).__name__)
                print(f"{name}: {call} failed ({type(error).__name__}: {first_line(error)}); the stage goes on "
                      f"without {name}", flush=True)

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.each("log", metrics, step)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
        self.each("log_table", key, columns, rows, step)

    def log_images(self, images: dict[str, Path], step: int | None = None) -> None:
        """{key: PNG file}, shown as pictures on the dashboards."""
        self.each("log_images", images, step)

    def log_artifact(self, name: str, kind: str, path) -> None:
        self.each("log_artifact", name, kind, path)

    def use_artifact(self, name: str, kind: str, path) -> None:
        self.each("use_artifact", name, kind, path)

    def finish(self, failed: bool = False) -> None:
        self.each("finish", failed)
        self.backends = []


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def start(trackers: list[str], project: str, run_name: str, stage: str, config: dict, directory: Path,
          is_main: bool = True, label: str | None = None) -> Tracker:
    """`label`: the tracked run's name after the run's (`<run>-<label>`), default the stage's; an online round
    after the first names its stages `round-<r>-<stage>`. A tracker that cannot start is said and left out."""
    if not is_main:
        return Tracker([])
    backends = []
    for name in trackers:
        try:
            backends.append(BACKENDS[name](project, run_name, stage, config, Path(directory), label or stage))
        except Exception as error:
            if name == "wandb" and os.environ.get("WANDB_MODE") in ("online", "run"):  # the server asked for
                Tracker(backends).finish(failed=True)
                raise
            print(f"{name}: could not start ({type(error).__name__}: {first_line(error)}); the stage goes on "
                  f"without {name}", flush=True)
    if backends:
        log.info("[%s] tracking with %s (group %s)", stage, ", ".join(b.name for b in backends), run_name)
    return Tracker(backends)


def namespaced(logs: dict) -> dict:
    """transformers' `eval_loss` -> `eval/loss`, `loss` -> `train/loss`; TRL's own metric names are kept."""
    out = {}
    for key, value in logs.items():
        if not isinstance(value, (int, float)):
            continue
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = value
    return out


class TrackingCallback(TrainerCallback):
    """Forwards a Trainer's logs to our Tracker, so TRL's trainers need no `report_to` of their own."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.tracker.log(namespaced(logs), step=state.global_step)
