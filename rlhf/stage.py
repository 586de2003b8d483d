"""What every training stage does around its work: one run of it at a time, its manifest entry, its tracker."""
import contextlib
import json
import statistics
import time
from pathlib import Path

from transformers import TrainerCallback

from rlhf import models, tracking
from rlhf.config import RunConfig, as_plain_dict, hashed_settings
from rlhf.errors import MissingInputError
from rlhf.runs import STAGE_RECORD, RunDir, StageRecord, stage_lock


@contextlib.contextmanager
def running_stage(run: RunConfig, stage: str, config, inputs: dict):
    """Yields (record, tracker). The main process holds the stage lock and records `running`, then `done` (the
    stage calls record.publish) or `failed` on any error; other processes get no record. The tracker always
    finishes. The config hash covers the settings that change the stage's outputs (rlhf.config.hashed_settings)."""
    run_dir = RunDir(run.output_root, run.name)
    is_main = config.process_index == 0
    plain_config = as_plain_dict(config)
    with stage_lock(run_dir, stage) if is_main else contextlib.nullcontext():
        record = StageRecord(run_dir, stage, hashed_settings(config), inputs) if is_main else None
        tracker = tracking.Tracker([])
        try:
            tracker = tracking.start(run.trackers, run.project, run.name, stage, plain_config,
                                     run_dir.path / "tracking", is_main)
            for name, kind, path in used_artifacts(inputs):
                tracker.use_artifact(name, kind, path)
            yield record, tracker
        except BaseException as err:
            if record:
                record.failed(err)
            raise
        finally:
            tracker.finish()


def used_artifacts(inputs: dict) -> list[tuple[str, str, str]]:
    """(artifact name, kind, path) of the inputs that earlier stages published: a stage folder (its stage.json
    names the run and stage, as the artifact `<run>-<stage>` it logged) or a label export (`<run>-preferences`
    when a run published it, else `labels-<content hash>`)."""
    used = []
    for path in inputs.values():
        folder = Path(str(path))
        record, export = folder / STAGE_RECORD, folder / "export.json"
        if record.is_file():
            stage = json.loads(record.read_text()).get("stage") or folder.name
            kind = "dataset" if export.is_file() else "model"
            used.append((f"{folder.parent.name}-{stage}", kind, str(folder)))
        elif export.is_file():
            used.append((f"labels-{json.loads(export.read_text())['content_hash']}", "dataset", str(folder)))
    return used


def starting_model(stage: str, model: str, run_dir: RunDir, field: str = "model") -> str:
    """The model a stage starts from: `model` (its config's `field`) when given (a bundled name, a folder, a hub
    id), else the run's published SFT model."""
    if model:
        return models.resolve(model)
    sft = run_dir.stage_path("sft")
    if not (sft / "config.json").exists():
        raise MissingInputError(f"no SFT model at {sft}: run `rlhf sft --config ... --run.name {run_dir.name}` "
                                f"first, or set --{stage}.{field}")
    return str(sft)


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint that finished saving: transformers writes trainer_state.json last."""
    steps = [int(p.name.rsplit("-", 1)[1]) for p in folder.glob("checkpoint-*")
             if p.name.rsplit("-", 1)[1].isdigit() and (p / "trainer_state.json").exists()]
    return str(folder / f"checkpoint-{max(steps)}") if steps else None


def checkpoint_step(checkpoint: str | None) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else 0


def resume_point(stage: str, partial: Path, resume: bool) -> str | None:
    """The checkpoint to resume from (with `resume`), said out loud either way."""
    checkpoint = last_complete_checkpoint(partial) if resume else None
    if resume and not checkpoint:
        print(f"[{stage}] --{stage}.resume: no checkpoint in {partial}; starting from the beginning")
    if checkpoint:
        print(f"[{stage}] resuming from {checkpoint}")
    return checkpoint


class StepTimer(TrainerCallback):
    """Wall seconds of each optimiser step; the median leaves out the first (warm-up) step."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)

    def median(self) -> float | None:
        timed = self.seconds[1:] or self.seconds
        return statistics.median(timed) if timed else None


class NoCheckpointAtTheEnd(TrainerCallback):
    """transformers saves a full checkpoint (model and optimizer state, ~1.6 GB for the bundled model) when training
    ends, though every stage then saves its model on its own: a checkpoint is kept only at multiples of
    `save_steps`. A stage killed after training and before publishing resumes from the last of those and
    retrains the steps after it, to the same result."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and state.save_steps and state.global_step % state.save_steps:
            control.should_save = False
