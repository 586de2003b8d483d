"""`rlhf run`: the whole loop in one command, resumable and incremental.

    rlhf run [--config configs/default.yaml] [--from STAGE | round-R/STAGE] [--launcher accelerate
             --accelerate_config FILE] [--section.field value ...]

Stages, in order (pipeline/stages.py): sft -> preferences -> reward -> ppo -> dpo -> eval. A stage takes part
when its section is in the config file. With `run.rounds: N` the chain is round 1, and each later round runs its
stages again (all but sft) with `--run.round R`, into runs/<name>/round-R/ (docs/online_rounds.md). Each stage
runs as its own process (the same command a person would type, so a stage's log, manifest entry and tracker run are
the same either way), one after another:

- a stage whose manifest entry is done, with the same config hash and the same hashes of the inputs it read, and
  whose output is in place, is skipped;
- a stage whose last attempt stopped (killed, failed) with the same config and inputs resumes from its newest
  checkpoint;
- anything else runs from the start, and so does every stage after a rerun one whose output changed (its input
  hashes no longer match);
- `--from STAGE` (or `--from round-R/STAGE`) reruns that stage and every stage after it, later rounds included,
  from the start.

The rules hold per round, each round's stage having its own manifest entry (`round-R/STAGE`): a setting changed
for round R only (a `round-R:` section) reruns round R's stages and what follows, and leaves earlier rounds done.

With `--launcher accelerate` the training stages (sft, reward, ppo, dpo) start under
`accelerate launch --config_file FILE`; the others run as one process.
"""
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.cli import STAGE_OF_A_RUN, die_with_parent
from pipeline.stages import SECTIONS, STAGES
from reward.train import SPLIT_SETTINGS, refuse_another_split
from rlhf.config import ROUND_SECTION, hashed_settings, load_config, password_hidden, read_yaml
from rlhf.errors import ConfigError, UserError
from rlhf.runs import (INPUTS_VERSION, SHARED_STAGES, RunDir, code_version, hash_config, input_hashes,
                        read_stage_record, remove_folder, run_lock, run_report, stage_key, stage_lock, work_key)
from rlhf.stage import (last_complete_checkpoint, naming_the_setting, partial_work_key, refuse_fixed_preferences,
                        refuse_fixed_reward_model)

class StageFailed(UserError):
    """A stage's process stopped with an error (its own message is above); `rlhf run` exits with its code."""

    def __init__(self, stage: str, code: int):
        super().__init__(f"stage {stage} stopped with exit code {code}; fix the cause and rerun `rlhf run` to "
                         "resume it")
        self.exit_code = code if code > 0 else 1


class Interrupted(UserError):
    """`rlhf run` was sent SIGINT or SIGTERM while a stage ran: it exits as the signal would (130, 143)."""

    def __init__(self, stage: str, signum: int, finished: bool = False):
        what = (f"stopped after stage {stage} finished" if finished else
                f"stage {stage} was stopped (its attempt is recorded as failed)")
        super().__init__(f"{signal.Signals(signum).name}: {what}; rerun `rlhf run` to go on (a training stage "
                         "resumes from its last checkpoint)")
        self.exit_code = 128 + signum


def stage_state(run_dir: RunDir, stage: str, config, inputs_now: dict | None = None) -> str:
    """done (skip), resume (same config and inputs, stopped part-way) or fresh. `inputs_now`: what the stage would
    read now (`current_inputs`), when known."""
    entry = run_dir.stage_entry(stage) or {}
    wanted = config_hash(config, run_dir.round)
    if entry.get("status") == "done" and same_work(entry, wanted, inputs_now) \
            and made_with(run_dir.stage_path(stage), wanted, entry.get("input_hashes")):
        return "done"
    attempt = entry.get("attempt") or entry  # the last attempt, kept apart when it followed a done one
    partial = run_dir.partial_path(stage)
    if attempt and same_work(attempt, wanted, inputs_now) and last_complete_checkpoint(partial) \
            and partial_work_key(partial) in (None, work_key(wanted, attempt.get("input_hashes", {}))):
        return "resume"  # (an attempt that failed before starting its work leaves an earlier attempt's checkpoints)
    return "fresh"


def remove_finished_leftover(run_dir: RunDir, stage: str) -> None:
    """The working folder that a done stage's own attempt left behind (killed between recording itself done and
    removing it), removed: its checkpoints would stay for good, since a stage up to date never runs again. Another
    attempt's (other settings or inputs, kept to resume), or one a stage running now holds, stays."""
    partial, entry = run_dir.partial_path(stage), run_dir.stage_entry(stage) or {}
    if not partial.exists() or partial_work_key(partial) != work_key(entry.get("config_hash"),
                                                                     entry.get("input_hashes", {})):
        return
    try:
        with stage_lock(run_dir, stage):
            remove_folder(partial)
    except UserError:
        pass  # that stage is running in another process: the folder is its own


def made_by_other_code(run_dir: RunDir, stage: str, key: str) -> str:
    """A note for a stage skipped as up to date that another version of the code made: settings and inputs decide
    what reruns, not the code, so a benchmark or a comparison rerun after a code change would read old results."""
    made_by = (run_dir.stage_entry(stage) or {}).get("code_version")
    now = code_version()
    if made_by is None or made_by == now:
        return ""
    return f" (made by code {made_by}, the code is now {now}: --from {key} reruns it)"


def current_inputs(stage, config, run) -> dict | None:
    """The inputs the stage would look up now ({name: path}), as its manifest entry records them: an eval that
    finds a policy published since, or a preference source that is a label store holding new votes (a new export
    snapshot), is not up to date. None when an input cannot be found: the stage says which when it runs."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the stage says what it found when it runs
            return {name: str(value) for name, value in stage.inputs(config, run).items()}
    except UserError:
        return None


def made_with(folder: Path, wanted_hash: str, wanted_inputs: dict | None) -> bool:
    """The published folder is there and was made with that config and those inputs' contents (a later attempt
    killed between publishing its folder and recording itself done leaves the earlier done entry beside the later
    folder: with other settings, or with input files changed and later changed back). Compared on the inputs the
    entry recorded (older code recorded fewer), where the folder's stage.json records them."""
    record = read_stage_record(folder)
    made_from = record.get("input_hashes")
    return record.get("config_hash") == wanted_hash and (
        made_from is None or {name: made_from.get(name) for name in wanted_inputs or {}} == (wanted_inputs or {}))


def same_work(entry: dict, wanted_hash: str, inputs_now: dict | None = None) -> bool:
    """The entry's config is the one wanted, it read the inputs the stage would read now (when known), and the
    files it read are as they were."""
    recorded = entry.get("inputs", {})
    if inputs_now is not None and entry.get("inputs_version", 1) < INPUTS_VERSION:
        inputs_now = {name: path for name, path in inputs_now.items() if name in recorded}  # made by older code
    return (entry.get("config_hash") == wanted_hash and (inputs_now is None or inputs_now == recorded)
            and entry.get("input_hashes") == input_hashes(recorded))


def config_hash(config, round: int = 1) -> str:
    """As the stage itself records it (rlhf.stage.running_stage): its hashed settings only."""
    return hash_config(hashed_settings(config, round))


def stage_overrides(overrides: list[str], section: str) -> list[str]:
    """The --run.* and --SECTION.* overrides, each as one --key=value token."""
    kept, i = [], 0
    while i < len(overrides):
        token = overrides[i]
        if "=" in token:
            key, value, i = token, None, i + 1
        else:
            key, value, i = token, overrides[i + 1], i + 2
        if key[2:].split(".", 1)[0] in ("run", section):
            kept.append(key if value is None else f"{key}={value}")
    return kept


def check_later_rounds(settings: dict, rounds: int) -> None:
    """What a later round's stages would refuse when they came, after round 1 had trained: refused before it."""
    for round in range(2, rounds + 1):
        stages = settings[round]
        for name in ("ppo", "dpo"):  # a later round's PPO (and on-policy DPO) learn from its own reward model
            if name in stages and getattr(stages[name], "pairs", "on_policy") == "on_policy":
                refuse_fixed_reward_model(name, stages[name].reward_model, round)
        for name in ("reward", "dpo"):
            if name in stages:
                refuse_fixed_preferences(name, stages[name].preferences, round)
        if "reward" in stages:
            earlier = settings[round - 1]["reward"]
            refuse_another_split(stages["reward"], {name: getattr(earlier, name) for name in SPLIT_SETTINGS}, round)
        policy = stages["preferences"].round_policy if "preferences" in stages else None
        if policy and policy not in stages:  # it found no policy, or an older run's left in the folder
            raise ConfigError(f"preferences.round_policy is {policy}, but this run has no {policy} stage: round "
                              f"{round} samples the previous round's {policy} policy; set preferences.round_policy "
                              f"to {' or '.join(name for name in ('ppo', 'dpo') if name in stages) or 'ppo or dpo'}")


def command(stage: str, config_path: str, overrides: list[str], launcher: list[str]) -> list[str]:
    return launcher + ["-m", "pipeline.cli", stage, "--config", config_path, *overrides]


def main(config_path: str, overrides: list[str], start_from: str | None = None, launcher: str = "python",
         accelerate_config: str | None = None) -> int:
    document = read_yaml(config_path, SECTIONS)
    chosen = [stage for stage in STAGES if stage.name in document]
    if launcher == "accelerate" and not accelerate_config:
        raise UserError("--launcher accelerate needs --accelerate_config FILE (configs/accelerate/*.yaml)")
    if accelerate_config and not Path(accelerate_config).is_file():
        raise UserError(f"{accelerate_config}: no such file (--accelerate_config)")
    if any(token.split("=")[0] == "--run.round" for token in overrides):
        raise UserError("rlhf run sets --run.round for each round itself: give --run.rounds N, or --from "
                        "round-R/STAGE to start at a round")
    classes = {"run": SECTIONS["run"], **{stage.name: stage.config_class for stage in chosen}}
    first = load_config(config_path, overrides, classes, SECTIONS)["run"]
    if first.round != 1:  # (round 1's stages read it from the file, and looked for round 1's outputs elsewhere)
        raise UserError(f"{config_path}: run.round: rlhf run sets the round for each round itself: leave it out, "
                        "give run.rounds N, or --from round-R/STAGE to start at a round")
    rounds = first.rounds
    check_round_sections(config_path, document)
    for later in range(rounds + 1, last_round_section(document) + 1):  # not run now: their keys checked anyway
        load_config(config_path, overrides + [f"--run.round={later}"], classes, SECTIONS)
    plan = round_plan(chosen, rounds)
    if start_from and start_from not in [key for key, _, _ in plan]:
        raise UserError(f"--from {start_from}: not a stage of this run ({', '.join(key for key, _, _ in plan)})")
    # every round's settings built (and so checked) before the first stage starts
    settings = {round: load_config(config_path, overrides + [f"--run.round={round}"], classes, SECTIONS)
                for round in range(1, rounds + 1)}
    check_later_rounds(settings, rounds)
    for key, round, stage in plan:  # every stage's own files (data, prompts, judges) before the first one writes
        if stage.files is not None:
            with naming_the_setting(stage.name, settings[round][stage.name]):
                stage.files(settings[round][stage.name], settings[round]["run"])
    if "preferences" in settings[1]:  # every round finds its prompts in the file (round 1: num_prompts of them)
        from preference_ui.collect import check_every_rounds_prompts

        check_every_rounds_prompts([settings[round]["preferences"] for round in range(1, rounds + 1)])
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started in the background from a script (the shell ignores SIGINT there): a SIGINT between stages stops
        # the run, as one during a stage does (it was dropped, and the run went on to its end)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with run_lock(settings[1]["run"].directory()):
        run_stages(plan, settings, start_from, launcher, accelerate_config, overrides, config_path)
        report = run_report(settings[max(settings)]["run"].directory()) if "eval" in document else None
    if report is not None:  # (a run without an eval stage leaves an earlier eval's report as it was)
        print(headline(report))
    return 0


def run_stages(plan: list, settings: dict, start_from: str | None, launcher: str, accelerate_config: str | None,
               overrides: list[str], config_path: str) -> None:
    """Each stage of `plan` that is not up to date, in its own process, in order; the stage times at the end."""
    forced, seconds = False, {}
    for key, round, stage in plan:
        sections = settings[round]
        run_dir = sections["run"].directory()
        forced = forced or start_from == key
        state = "fresh" if forced else stage_state(run_dir, stage.name, sections[stage.name],
                                                   current_inputs(stage, sections[stage.name], sections["run"]))
        if state == "done":
            print(f"[run] {key}: up to date, skipped{made_by_other_code(run_dir, stage.name, key)}", flush=True)
            remove_finished_leftover(run_dir, stage.name)
            continue
        # rlhf run decides: a `resume: true` in the config would continue another attempt's checkpoints
        extra = [f"--{stage.name}.resume={str(state == 'resume').lower()}"] if stage.trains else []
        extra += [f"--run.round={round}"] if round > 1 else []
        start = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
                 if launcher == "accelerate" and stage.trains else [sys.executable])
        print(f"[run] {key}: {'resuming' if state == 'resume' else 'running'}", flush=True)
        argv = command(stage.name, config_path, stage_overrides(overrides, stage.name) + extra, start)
        print(f"[run] $ {' '.join(shown(token) for token in argv)}", flush=True)
        started = time.monotonic()
        returncode, stopped_by = stage_process(argv)
        if returncode == 0:
            seconds[key] = time.monotonic() - started
            print(f"[run] {key}: finished in {minutes(seconds[key])}", flush=True)
        if stopped_by is not None or returncode != 0:
            if seconds:  # the stages that did finish, before the error
                print(timings(seconds), flush=True)
            if stopped_by is not None:  # (a signal that came as the stage ended leaves it done)
                raise Interrupted(key, stopped_by, finished=returncode == 0)
            raise StageFailed(key, returncode)
    print(timings(seconds))


def shown(token: str) -> str:
    """A command-line token as the log shows it: a URL's password (`--preferences.db=postgresql://u:pw@...`)
    hidden."""
    key, equals, value = token.partition("=")
    return f"{key}={password_hidden(value)}" if equals else password_hidden(token)


def own_group_dying_with_parent() -> None:
    """In the stage's process, before it starts: a process group of its own (Ctrl-C at the terminal then reaches
    only `rlhf run`, which passes it on once), SIGINT handled as Python does by default (a shell starting
    `rlhf run ... &` from a script leaves it ignored, and Python then keeps ignoring it: the SIGINT passed on would
    not stop the stage), and death with `rlhf run`."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    die_with_parent()


def stage_process(argv: list[str]) -> tuple[int, int | None]:
    """Runs one stage's process to its end: (exit code, the signal that stopped `rlhf run` or None). The stage has
    a process group of its own, so Ctrl-C (SIGINT) or SIGTERM reaching `rlhf run` is passed on as one SIGINT, and
    `rlhf run` waits while the stage records its attempt as failed and closes its trackers (a second signal kills
    it at once)."""
    child = subprocess.Popen(argv, preexec_fn=own_group_dying_with_parent, env={**os.environ, STAGE_OF_A_RUN: "1"})
    stopped_by = []

    def pass_on(signum, frame):
        child.send_signal(signal.SIGINT if not stopped_by else signal.SIGKILL)
        stopped_by.append(signum)

    previous = {signum: signal.signal(signum, pass_on) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        returncode = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return returncode, (stopped_by[0] if stopped_by else None)


def last_round_section(document: dict) -> int:
    return max((int(str(name).split("-")[1]) for name in document if ROUND_SECTION.fullmatch(str(name))), default=1)


def check_round_sections(config_path: str, document: dict) -> None:
    """Each stage a `round-R:` section sets must be a stage the run has (else no round would use it)."""
    for name, sections in document.items():
        if not ROUND_SECTION.fullmatch(str(name)):
            continue
        for stage in sections or {}:
            if stage not in document:
                raise ConfigError(f"{config_path}: {name}.{stage}: the run has no '{stage}' section, so no round "
                                  "runs that stage")


def round_plan(chosen: list, rounds: int) -> list[tuple[str, int, object]]:
    """(manifest key, round, stage) in the order `rlhf run` takes them: round 1's stages, then each later round's
    (all but the SFT model, which every round shares)."""
    if rounds > 1:
        needed = [name for name in ("preferences", "reward") if name not in [stage.name for stage in chosen]]
        if needed or not {"ppo", "dpo"} & {stage.name for stage in chosen}:
            raise UserError(f"run.rounds {rounds}: online rounds need the preferences and reward sections and a ppo "
                            f"or dpo section in the config (missing: {', '.join(needed) or 'ppo or dpo'})")
    plan = []
    for round in range(1, rounds + 1):
        for stage in chosen:
            if round == 1 or stage.name not in SHARED_STAGES:
                plan.append((stage_key(stage.name, round), round, stage))
    return plan


def minutes(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s" if whole >= 60 else f"{whole} s"


def timings(seconds: dict) -> str:
    """The wall time of each stage this invocation ran (process start included) and their sum."""
    if not seconds:
        return "[run] every stage was up to date"
    rows = [f"  {stage:<12} {minutes(taken)}" for stage, taken in seconds.items()]
    return "\n".join(["[run] wall time of the stages run now:", *rows,
                      f"  {'total':<12} {minutes(sum(seconds.values()))}"])


def headline(report: str) -> str:
    """The report's title and headline table."""
    lines = report.splitlines()
    table = [line for line in lines if line.startswith("|")]
    return "\n".join([lines[0], "", *table])
