"""The stage contract. A stage declares its name (its command, config section, run folder and manifest entry), its
config class, its inputs, how it reads and checks them, and its work (`Stage`); `run_stage` does the rest in the
same order for every stage: inputs found (every missing one named at once), input files read and checked, and only
then the lock, the manifest record, the tracker, the work, publishing, the artifact and the final log line.
pipeline/stages.py lists the stages in pipeline order for the CLI and `rlhf run`."""
import contextlib
import json
import statistics
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from rlhf import models, tracking
from rlhf.config import RunConfig, as_plain_dict, hashed_settings
from rlhf.errors import ConfigError, DataError, MissingInputError, ModelError
from rlhf.preference_pairs import publish_pending_exports
from rlhf.runs import STAGE_RECORD, RunDir, StageRecord, remove_folder, stage_lock


@dataclass(frozen=True)
class Outcome:
    """What a stage's work made: the complete folder to publish (`staged`, inside the working folder `partial`),
    the metrics its manifest entry and stage.json record, and what `run_stage` returns (the metrics unless
    given). `staged` is None on processes other than the main one, which publish nothing."""

    metrics: dict
    staged: Path | None
    partial: Path
    seconds: float
    summary: str  # the final log line: "[stage] done: <folder> (<summary>)"
    artifact: str = "model"  # its kind in the trackers
    extra: dict | None = None  # more for stage.json, read by later stages
    returned: dict | None = None
    after_publishing: Callable | None = None  # called once the folder is published (main process)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline. `inputs(config, run)` returns what it reads ({name: path or spec}, as the
    manifest records them; `Inputs` gathers them), raising MissingInputError that names every missing one;
    `check(config, run, found)` reads and checks the input files and returns what they hold; `work(config, run,
    found, checked, tracker, record)` runs with the lock held and returns an Outcome."""

    name: str
    help: str
    config_class: type
    inputs: Callable
    check: Callable
    work: Callable
    trains: bool = False  # started under `accelerate launch` by `rlhf run --launcher accelerate`
    # (config, run): reads and checks the files the config names (data, prompts, judges), not what earlier stages
    # make, so that `rlhf run` refuses a bad file of any stage before the first stage writes anything
    files: Callable | None = None
    actions: dict = field(default_factory=dict)  # `rlhf NAME ACTION`: {action: (function(config, run), help)}


def run_stage(stage: Stage, config, run: RunConfig) -> dict:
    """Inputs found and checked before anything is written; then the stage's work under its lock and record, and
    its folder published whole."""
    found = stage.inputs(config, run)
    with naming_the_setting(stage.name, config):
        checked = stage.check(config, run, found)
    with running_stage(run, stage.name, config, found) as (record, tracker):
        outcome = stage.work(config, run, found, checked, tracker, record)
        if record is not None and outcome.staged is not None:
            final = record.publish(outcome.staged, outcome.partial, outcome.metrics, outcome.seconds, outcome.extra)
            if outcome.after_publishing is not None:
                outcome.after_publishing()
            tracker.log_artifact(f"{run.name}-{record.run.label(stage.name)}", outcome.artifact, final)
            print(f"[{stage.name}] done: {final} ({outcome.summary})", flush=True)
    wait_for_other_processes()
    return outcome.metrics if outcome.returned is None else outcome.returned


@contextlib.contextmanager
def naming_the_setting(stage: str, config):
    """A data file that cannot be read at all (missing, of a type we cannot read, empty) is said with the setting
    that names it, as a judge or a model is (`/x.jsonl: file: not found (sft.train_data)`)."""
    try:
        yield
    except DataError as err:
        settings = [f"{stage}.{each.name}" for each in fields(config)
                    if err.line is None and str(getattr(config, each.name)) == err.path]
        if not settings:
            raise
        raise DataError(err.path, None, err.field, f"{err.problem} ({', '.join(settings)})") from None


def wait_for_other_processes() -> None:
    """Under a multi-process launcher, no process leaves before the main one has published."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Inputs:
    """A stage's inputs as the manifest records them ({name: path or spec}). A lookup that finds its input missing
    is kept, not raised, so that `found()` names every missing input at once, in the order they were looked up
    (the stages look them up in pipeline order: the SFT model, the preferences, the reward model, the policies)."""

    def __init__(self):
        self.gathered: dict = {}
        self.missing: list[str] = []

    def add(self, name: str, lookup) -> None:
        """`lookup`: the value, or a function that returns it (a dict: several inputs at once) or raises
        MissingInputError."""
        try:
            value = lookup() if callable(lookup) else lookup
        except MissingInputError as err:
            self.missing.append(str(err))
            return
        if isinstance(value, dict):
            self.gathered.update(value)
        else:
            self.gathered[name] = value

    def found(self) -> dict:
        if len(self.missing) == 1:
            raise MissingInputError(self.missing[0])
        if self.missing:
            raise MissingInputError(f"{len(self.missing)} inputs are missing:\n" +
                                    "\n".join(f"  - {message}" for message in self.missing))
        return self.gathered


def published_model(run_dir: RunDir, maker: str, what: str, folder: str | None, setting: str) -> str:
    """`folder` when given, else the run's published `maker` stage; either must hold a model (config.json)."""
    folder = folder or str(run_dir.stage_path(maker))
    if not (Path(folder) / "config.json").exists():
        raise MissingInputError(f"no {what} at {folder}: run `rlhf {maker} --config ...` first, or set {setting}")
    return folder


def published_reward_model(run_dir: RunDir, folder: str | None, setting: str) -> str:
    """`folder` when given, else the run's reward model: a sequence classifier (a language model given here would
    score with a new, random head)."""
    folder = published_model(run_dir, "reward", "reward model", folder, setting)
    architectures = model_architectures(folder)
    if not sequence_classifier(architectures):
        raise ModelError(f"{folder}: not a reward model (its config.json names {', '.join(architectures) or 'no'} "
                         f"architecture, not a sequence classifier: its score head would be random); set "
                         f"{setting.split(' ')[0]} to a reward stage's folder, runs/<name>/reward")
    return folder


def model_architectures(folder: str) -> list[str]:
    """The architectures a model folder's config.json names (none for a hub id or a folder without one)."""
    config = Path(folder) / "config.json"
    return (json.loads(config.read_text()).get("architectures") or []) if config.is_file() else []


def sequence_classifier(architectures: list[str]) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def check_language_model(folder: str, setting: str) -> None:
    """A reward model's folder given where a language model is wanted loads with a new, random LM head (a
    warning only) and writes noise."""
    architectures = model_architectures(folder)
    if sequence_classifier(architectures):
        raise ModelError(f"{setting}: {folder} is a reward model ({', '.join(architectures)}), not a language model: "
                         "its answers would come from a new, random head")


# what a later online round's reward model and DPO learn from
ROUND_PAIRS = {"reward": "every round's own votes (runs/<name>/preferences, round-2/preferences, ...)",
               "dpo": "the round's own pairs (round-{round}/preferences)"}


def refuse_fixed_preferences(stage: str, preferences: str, round: int) -> None:
    """An online round's reward model and DPO learn from the run's own votes, not a fixed source."""
    if preferences and round > 1:
        raise ConfigError(f"{stage}.preferences is set, but online round {round} trains on "
                          f"{ROUND_PAIRS[stage].format(round=round)}: for round 1 alone, set it in the config "
                          f"file's {stage} section (the command line sets every round) and give each later round a "
                          f"`round-R:` section with {stage}: {{preferences: ''}}")


def refuse_fixed_reward_model(stage: str, reward_model: str, round: int) -> None:
    """An online round's policy learns from that round's reward model, trained on every round's votes so far."""
    if reward_model and round > 1:
        raise ConfigError(f"{stage}.reward_model is set, but online round {round} trains against its own reward "
                          f"model (runs/<name>/round-{round}/reward): leave it empty")


def earlier_round_model(run_dir: RunDir, stage: str, what: str) -> str:
    """For online round r > 1: the model folder round r-1's `stage` published (its policy, its reward model)."""
    earlier = run_dir.in_round(run_dir.round - 1)
    folder = earlier.stage_path(stage)
    if not (folder / "config.json").exists():
        raise MissingInputError(f"no {what} at {folder}: round {run_dir.round} continues from round {earlier.round}; "
                                f"run `rlhf {stage} --config ... --run.round {earlier.round}` first")
    return str(folder)


def round_seed(seed: int, round: int) -> int:
    """The seed a stage samples with in an online round: the next one each round, so later rounds draw fresh
    answers and prompt orders, and round 1 draws as a run without rounds."""
    return seed + round - 1


WORK_KEY = "work_key"  # in a stage's working folder: the config and inputs its checkpoints were made from


def start_partial(stage: str, partial: Path, resume: bool, record: StageRecord | None = None) -> str | None:
    """The stage's working folder made ready (on the main process): with `resume` and a complete checkpoint in
    it, only the half-written final folder is removed and the checkpoint returned; otherwise it starts empty, with
    the attempt's work key (`record`: its config and inputs) in it, for `rlhf run` to resume only that work."""
    checkpoint = resume_point(stage, partial, resume)
    if checkpoint and record is not None and partial_work_key(partial) not in (None, record.work_key):
        print(f"[{stage}] --{stage}.resume: {checkpoint} was made with other settings or inputs than this "
              f"attempt's; continuing from it as asked (without --{stage}.resume the stage starts afresh)")
    remove_folder(partial / "final" if checkpoint else partial)
    partial.mkdir(parents=True, exist_ok=True)
    if record is not None and not checkpoint:
        (partial / WORK_KEY).write_text(record.work_key)
    return checkpoint


def started_everywhere(stage: str, partial: Path, resume: bool, record: StageRecord | None,
                       is_main: bool) -> str | None:
    """`start_partial` on the main process only, then the checkpoint to resume from on every process. (Run on every
    process, another process's fresh start removed the folder: the main one's work key, or the checkpoints of a
    run of the same stage already going, whose lock only the main process had asked for.)"""
    from accelerate import PartialState

    if is_main:
        start_partial(stage, partial, resume, record)
    PartialState().wait_for_everyone()
    return last_complete_checkpoint(partial) if resume else None


def partial_work_key(partial: Path) -> str | None:
    """The work key of the checkpoints in a stage's working folder (None if it has none: made before keys were)."""
    path = partial / WORK_KEY
    return path.read_text() if path.is_file() else None


@contextlib.contextmanager
def running_stage(run: RunConfig, stage: str, config, inputs: dict):
    """Yields (record, tracker). The main process holds the stage lock, moves in the label-store exports the
    stage's inputs made (rlhf.preference_pairs) and records `running`, then `done` (the
    stage calls record.publish) or `failed` on any error; other processes get no record. The tracker always
    finishes (a failed stage's wandb run as failed); it is given the stage's config and the run's name and round.
    The config hash covers the settings that change the stage's outputs (rlhf.config.hashed_settings)."""
    run_dir = run.directory()
    is_main = config.process_index == 0
    plain_config = {**as_plain_dict(config), "run": {"name": run.name, "round": run.round, "rounds": run.rounds}}
    with stage_lock(run_dir, stage) if is_main else contextlib.nullcontext():
        if is_main:
            publish_pending_exports()
        record = StageRecord(run_dir, stage, hashed_settings(config, run.round), inputs) if is_main else None
        tracker, failed = tracking.Tracker([]), False
        try:
            tracker = tracking.start(run.trackers, run.project, run.name, stage, plain_config,
                                     run_dir.path / "tracking", is_main, run_dir.label(stage))
            for name, kind, path in used_artifacts(inputs):
                tracker.use_artifact(name, kind, path)
            yield record, tracker
        except BaseException as err:
            failed = True
            if record:
                record.failed(err)
            raise
        finally:
            tracker.finish(failed)


def used_artifacts(inputs: dict) -> list[tuple[str, str, str]]:
    """(artifact name, kind, path) of the inputs that earlier stages published: a stage folder (its stage.json
    names the run and stage, as the artifact `<run>-<stage>` it logged) or a label export (`<run>-preferences`
    when a run published it, else `labels-<content hash>`)."""
    used = []
    for path in inputs.values():
        folder = Path(str(path))
        record, export = folder / STAGE_RECORD, folder / "export.json"
        if record.is_file():
            written = json.loads(record.read_text())
            kind = "dataset" if export.is_file() else "model"
            used.append((written.get("artifact") or f"{folder.parent.name}-{written.get('stage') or folder.name}",
                         kind, str(folder)))
        elif export.is_file():
            used.append((f"labels-{json.loads(export.read_text())['content_hash']}", "dataset", str(folder)))
    return used


def starting_model(stage: str, model: str, run_dir: RunDir, field: str = "model",
                   language_model: bool = True) -> str:
    """The model a stage starts from: `model` (its config's `field`) when given (a bundled name, a folder, a hub
    id), else the run's published SFT model. With `language_model`, a reward model's folder is refused."""
    if model:
        found = models.resolve(model)
        if language_model:
            check_language_model(found, f"{stage}.{field}")
        return found
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
