import dataclasses
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from rlhf.errors import UserError
from rlhf.runs import (RunDir, StageRecord, atomic_write_json, atomic_write_text, hash_config, hash_path,
                       stage_lock)


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_text(target, None)  # fails mid-write
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary file left behind
    assert oct(target.stat().st_mode & 0o777) == "0o644"


def test_publish_swaps_in_a_complete_folder(tmp_path):
    run = RunDir(tmp_path, "r")
    (run.path / ".sft.old-123").mkdir(parents=True)  # left by a publish killed half-way
    for version in ("old", "new"):
        staged = tmp_path / f"staged-{version}"
        staged.mkdir()
        (staged / "weights").write_text(version)
        run.publish("sft", staged)
    assert (run.stage_path("sft") / "weights").read_text() == "new"
    assert sorted(p.name for p in run.path.iterdir()) == ["sft"]


def test_publish_over_a_published_folder_exchanges_the_two_in_one_step(tmp_path, monkeypatch):
    """Linux exchanges two folders at once: no moment (where a kill would leave it) without the stage folder,
    so publishing over one never renames it aside."""
    run = RunDir(tmp_path, "r")
    for version in ("old", "new"):
        staged = tmp_path / f"staged-{version}"
        staged.mkdir()
        (staged / "weights").write_text(version)
        if version == "new":
            monkeypatch.setattr(os, "replace", lambda *args: pytest.fail("renamed aside"))
        run.publish("sft", staged)
    assert (run.stage_path("sft") / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"] and sorted(p.name for p in run.path.iterdir()) == ["sft"]


def record_many(root, stage):
    run = RunDir(root, "r")
    for i in range(15):
        run.record(stage, count=i)


def test_concurrent_stage_records_lose_nothing(tmp_path):
    workers = [multiprocessing.Process(target=record_many, args=(tmp_path, f"s{i}")) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    stages = RunDir(tmp_path, "r").read_manifest()["stages"]
    assert {name: entry["count"] for name, entry in stages.items()} == {f"s{i}": 14 for i in range(4)}


def test_stage_record_lifecycle(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    run = RunDir(tmp_path, "r")
    record = StageRecord(run, "sft", {"lr": 1}, {"train_data": data})
    entry = run.stage_entry("sft")
    assert entry["status"] == "running" and entry["config_hash"] == hash_config({"lr": 1})
    assert entry["input_hashes"] == {"train_data": hash_path(data)}
    record.done({"model": run.stage_path("sft")}, {"loss": 0.5})
    entry = run.stage_entry("sft")
    assert entry["status"] == "done" and entry["metrics"] == {"loss": 0.5} and entry["timings"]["total_s"] >= 0
    assert entry["outputs"] == {"model": str(run.stage_path("sft"))} and entry["code_version"]
    record.failed(RuntimeError("boom"))  # a failure after done (say, in a tracker's teardown) is kept apart
    assert run.stage_entry("sft")["status"] == "done"
    assert run.stage_entry("sft")["attempt"]["error"] == "RuntimeError: boom"


@dataclasses.dataclass
class LearningRate:
    lr: float
    resume: bool = False


def test_only_the_main_process_clears_a_stages_working_folder(tmp_path):
    """A process other than the main one (which alone holds the stage lock) leaves the folder as it is: the
    checkpoints of a run of the stage already going, or the main process's work key."""
    from rlhf.stage import WORK_KEY, started_everywhere

    partial = tmp_path / ".sft.partial"
    (partial / "checkpoint-4").mkdir(parents=True)
    (partial / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (partial / WORK_KEY).write_text("theirs")
    assert started_everywhere("sft", partial, False, None, is_main=False) is None
    assert (partial / "checkpoint-4" / "trainer_state.json").exists() and (partial / WORK_KEY).read_text() == "theirs"
    assert started_everywhere("sft", partial, True, None, is_main=False) == str(partial / "checkpoint-4")
    assert started_everywhere("sft", partial, False, None, is_main=True) is None and not any(partial.iterdir())


def test_a_failed_attempt_leaves_a_done_record_as_it_was_and_rlhf_run_resumes_that_attempt(tmp_path, capsys):
    from pipeline.run import stage_state
    from rlhf.stage import WORK_KEY, partial_work_key, start_partial

    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    run = RunDir(tmp_path, "r")
    first = StageRecord(run, "sft", {"lr": 1}, {"train_data": data})
    staged = tmp_path / "staged"
    staged.mkdir()
    first.publish(staged, run.partial_path("sft"), {"loss": 0.5}, 1.0)
    done = run.stage_entry("sft")

    second = StageRecord(run, "sft", {"lr": 2}, {"train_data": data})
    assert run.stage_entry("sft")["attempt"]["status"] == "running"
    second.failed(RuntimeError("out of memory"))
    entry = run.stage_entry("sft")
    assert {k: v for k, v in entry.items() if k != "attempt"} == done
    assert entry["attempt"]["status"] == "failed" and entry["attempt"]["config_hash"] == hash_config({"lr": 2})
    assert stage_state(run, "sft", LearningRate(1)) == "done"  # the done output still stands for its config
    assert stage_state(run, "sft", LearningRate(2)) == "fresh"  # no checkpoint of the failed attempt
    (run.partial_path("sft") / "checkpoint-3").mkdir(parents=True)
    (run.partial_path("sft") / "checkpoint-3" / "trainer_state.json").write_text("{}")
    assert stage_state(run, "sft", LearningRate(2)) == "resume"
    assert stage_state(run, "sft", LearningRate(3)) == "fresh"
    # checkpoints keep the work key of the attempt that made them: an attempt that failed before starting its work
    # (so before clearing the folder) does not resume an earlier attempt's checkpoints as its own
    start_partial("sft", run.partial_path("sft"), resume=True, record=second)  # resuming: the key stays as it was
    assert partial_work_key(run.partial_path("sft")) is None
    (run.partial_path("sft") / WORK_KEY).write_text(first.work_key)  # lr 1's checkpoints
    assert stage_state(run, "sft", LearningRate(2)) == "fresh"
    capsys.readouterr()
    start_partial("sft", run.partial_path("sft"), resume=True, record=second)  # asked to resume them: said so
    assert "checkpoint-3 was made with other settings or inputs" in capsys.readouterr().out
    start_partial("sft", run.partial_path("sft"), resume=True, record=first)
    assert "other settings" not in capsys.readouterr().out
    (run.partial_path("sft") / WORK_KEY).write_text(second.work_key)
    assert stage_state(run, "sft", LearningRate(2)) == "resume"

    third = StageRecord(run, "sft", {"lr": 2}, {"train_data": data})
    start_partial("sft", run.partial_path("sft"), resume=False, record=third)  # a fresh start keeps its own key
    assert partial_work_key(run.partial_path("sft")) == third.work_key == second.work_key
    staged.mkdir()
    (staged / "stage.json").write_text(json.dumps({"config_hash": hash_config({"lr": 2})}))
    run.publish("sft", staged)  # killed here, before the attempt recorded itself done: the folder is lr 2's
    assert stage_state(run, "sft", LearningRate(1)) == "fresh"
    # the same settings as the done entry, but the data was changed for the killed attempt and changed back since
    staged.mkdir()
    (staged / "stage.json").write_text(json.dumps({"config_hash": hash_config({"lr": 1}),
                                                   "input_hashes": {"train_data": "other data"}}))
    run.publish("sft", staged)
    assert stage_state(run, "sft", LearningRate(1)) == "fresh"
    staged.mkdir()
    third.publish(staged, run.partial_path("sft"), {"loss": 0.4}, 1.0)
    assert stage_state(run, "sft", LearningRate(2)) == "done"
    entry = run.stage_entry("sft")
    assert entry["status"] == "done" and entry["metrics"] == {"loss": 0.4} and "attempt" not in entry
    assert entry["config_hash"] == hash_config({"lr": 2})


def test_hashes_follow_content(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("1")
    first = hash_path(tmp_path / "a")
    (tmp_path / "a" / "f").write_text("2")
    assert hash_path(tmp_path / "a") != first
    assert hash_config({"a": 1, "b": 2}) == hash_config({"b": 2, "a": 1})


def test_a_second_process_cannot_run_the_same_stage_of_the_same_run(tmp_path):
    run = RunDir(tmp_path, "r")
    with stage_lock(run, "sft"):
        with pytest.raises(UserError, match="stage 'sft' of run 'r' is already running"):
            with stage_lock(RunDir(tmp_path, "r"), "sft"):
                pass
    with stage_lock(run, "sft"):  # released afterwards
        pass


def test_run_names_are_plain_folder_names(tmp_path):
    for bad in ("", "a/b", ".hidden", "my run", "exp:1", "r+1"):  # the last three: no tracker artifact name
        with pytest.raises(ValueError):
            RunDir(tmp_path, bad)


def test_an_eval_is_not_up_to_date_once_a_policy_it_would_read_is_published(tmp_path):
    """`rlhf run` compares what a stage would read now with what it read: a dpo section added to the config
    publishes a policy the finished eval (which reads every policy there is) never saw, so the eval reruns."""
    from pipeline.run import current_inputs, stage_state
    from pipeline.stages import BY_NAME, SECTIONS
    from rlhf.config import hashed_settings, load_config

    sections = load_config("configs/tiny.yaml", [f"--run.output_root={tmp_path}"], SECTIONS, SECTIONS)
    run, config, eval_stage = sections["run"], sections["eval"], BY_NAME["eval"]
    run_dir = run.directory()
    for stage, model in (("sft", "LlamaForCausalLM"), ("reward", "LlamaForSequenceClassification"),
                         ("ppo", "LlamaForCausalLM")):
        run_dir.stage_path(stage).mkdir(parents=True)
        (run_dir.stage_path(stage) / "config.json").write_text(json.dumps({"architectures": [model]}))
    record = StageRecord(run_dir, "eval", hashed_settings(config, 1), eval_stage.inputs(config, run))
    staged = run_dir.partial_path("eval") / "final"
    staged.mkdir(parents=True)
    record.publish(staged, run_dir.partial_path("eval"), {}, 0.0)
    assert stage_state(run_dir, "eval", config, current_inputs(eval_stage, config, run)) == "done"
    run_dir.stage_path("dpo").mkdir()
    (run_dir.stage_path("dpo") / "config.json").write_text("{}")
    assert stage_state(run_dir, "eval", config) == "done"  # the files it read are as they were
    assert stage_state(run_dir, "eval", config, current_inputs(eval_stage, config, run)) == "fresh"


def test_the_gold_file_and_a_team_store_are_inputs_so_changing_them_reruns_the_preferences_stage(tmp_path,
                                                                                                   monkeypatch):
    """What a stage reads besides its config is recorded with its content hash: `rlhf run` reruns the preferences
    stage when its gold file changes or $RLHF_DB_URL names another store (the run's own store goes with its folder
    and is not recorded). A stage recorded by older code, with fewer inputs, is compared on those it recorded."""
    from pipeline.run import current_inputs, stage_state
    from pipeline.stages import BY_NAME, SECTIONS
    from rlhf.config import hashed_settings, load_config

    monkeypatch.delenv("RLHF_DB_URL", raising=False)
    gold = tmp_path / "gold.jsonl"
    gold.write_text('{"prompt": "Hi?", "a": "Hello.", "b": "Go away.", "expected": "a"}\n')
    sections = load_config("configs/tiny.yaml", [f"--run.output_root={tmp_path}", f"--preferences.gold={gold}"],
                           SECTIONS, SECTIONS)
    run, preferences, sft = sections["run"], sections["preferences"], sections["sft"]
    run_dir = run.directory()
    for stage, config in (("sft", sft), ("preferences", preferences)):  # SFT publishes the model preferences reads
        inputs = BY_NAME[stage].inputs(config, run)
        record = StageRecord(run_dir, stage, hashed_settings(config, 1), inputs)
        staged = run_dir.partial_path(stage) / "final"
        staged.mkdir(parents=True)
        (staged / "config.json").write_text("{}")
        record.publish(staged, run_dir.partial_path(stage), {}, 0.0)
    assert inputs["gold"] == str(gold) and "store" not in inputs

    def state() -> str:
        return stage_state(run_dir, "preferences", preferences, current_inputs(BY_NAME["preferences"], preferences,
                                                                               run))

    assert state() == "done"
    gold.write_text(gold.read_text().replace("Go away.", "No."))
    assert state() == "fresh"
    gold.write_text(gold.read_text().replace("No.", "Go away."))
    assert state() == "done"
    monkeypatch.setenv("RLHF_DB_URL", "postgresql+psycopg://ann:secret@db.example/labels")
    assert BY_NAME["preferences"].inputs(preferences, run)["store"] == "postgresql+psycopg://ann:***@db.example/labels"
    assert state() == "fresh"
    manifest = json.loads((run_dir.path / "manifest.json").read_text())
    entry = manifest["stages"]["preferences"]
    del entry["inputs_version"], entry["inputs"]["gold"], entry["input_hashes"]["gold"]  # as the older code wrote it
    (run_dir.path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.delenv("RLHF_DB_URL")
    assert state() == "done"  # not rerun (with every stage after it) for the inputs it did not record


def test_an_eval_scored_by_a_users_judge_reruns_once_the_judges_code_changes(tmp_path, monkeypatch):
    """A `module:function` judge's file is one of the eval's inputs (built-in judges are the project's code)."""
    from pipeline.run import current_inputs, stage_state
    from pipeline.stages import BY_NAME, SECTIONS
    from rlhf.config import hashed_settings, load_config

    (tmp_path / "my_judge.py").write_text("def polite(prompts, answers):\n    return [0.0] * len(answers)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sections = load_config("configs/tiny.yaml", [f"--run.output_root={tmp_path}", "--eval.judge=my_judge:polite",
                                                 "--eval.reward_model=none"], SECTIONS, SECTIONS)
    run, config, eval_stage = sections["run"], sections["eval"], BY_NAME["eval"]
    run_dir = run.directory()
    for stage in ("sft", "ppo"):
        run_dir.stage_path(stage).mkdir(parents=True)
        (run_dir.stage_path(stage) / "config.json").write_text("{}")
    inputs = eval_stage.inputs(config, run)
    assert inputs["judge"] == str(tmp_path / "my_judge.py") and set(inputs) == {"sft", "ppo", "prompts", "judge"}
    record = StageRecord(run_dir, "eval", hashed_settings(config, 1), inputs)
    staged = run_dir.partial_path("eval") / "final"
    staged.mkdir(parents=True)
    record.publish(staged, run_dir.partial_path("eval"), {}, 0.0)
    assert stage_state(run_dir, "eval", config, current_inputs(eval_stage, config, run)) == "done"
    (tmp_path / "my_judge.py").write_text("def polite(prompts, answers):\n    return [1.0] * len(answers)\n")
    assert stage_state(run_dir, "eval", config, current_inputs(eval_stage, config, run)) == "fresh"


def test_rlhf_runs_decision_pass_reads_a_label_store_quietly_and_writes_nothing(tmp_path, capsys):
    """Whether the reward stage is up to date is decided on the store's export as it would be now: found (its
    folder named by content hash) without the "[reward] exported N pairs" line, which the stage itself prints when
    it runs, and without writing the export into the run folder."""
    from pipeline.run import current_inputs
    from pipeline.stages import BY_NAME, SECTIONS
    from rlhf.config import load_config
    from tests.test_reward import store_with_votes

    url = store_with_votes(tmp_path, 6)
    sections = load_config("configs/tiny.yaml", [f"--run.output_root={tmp_path / 'runs'}",
                                                 f"--reward.preferences={url}"], SECTIONS, SECTIONS)
    run, config = sections["run"], sections["reward"]
    run.directory().stage_path("sft").mkdir(parents=True)  # the model reward starts from
    (run.directory().stage_path("sft") / "config.json").write_text("{}")
    capsys.readouterr()
    inputs = current_inputs(BY_NAME["reward"], config, run)
    assert Path(inputs["preferences"]).parent == run.directory().path / "exports"
    assert not Path(inputs["preferences"]).exists() and capsys.readouterr().out == ""


def test_a_stop_while_the_working_folder_is_removed_leaves_the_stage_done_and_no_half_removed_checkpoint(
        tmp_path, monkeypatch):
    """Publishing ends by removing the stage's working folder (gigabytes of checkpoints: seconds): a Ctrl-C then
    recorded the stage failed beside its complete folder (a rerun trained it again), and a checkpoint whose weights
    were gone but whose trainer_state.json was not passed for a complete one to resume from."""
    import shutil

    import rlhf.runs as runs

    run = RunDir(tmp_path, "r")
    record = StageRecord(run, "sft", {"lr": 1}, {})
    partial, real_rmtree = run.partial_path("sft"), shutil.rmtree
    (partial / "checkpoint-3").mkdir(parents=True)
    (partial / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (partial / "final").mkdir()
    (partial / "final" / "config.json").write_text("{}")

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        record.publish(partial / "final", partial, {"loss": 0.5}, 1.0)
    assert run.stage_entry("sft")["status"] == "done" and (run.stage_path("sft") / "config.json").exists()
    assert not partial.exists()  # set aside whole before its removal began
    [aside] = [p for p in tmp_path.joinpath("r").iterdir() if p.name.startswith(".sft.partial.removing-")]
    monkeypatch.setattr(runs.shutil, "rmtree", real_rmtree)
    runs.remove_folder(partial)  # the next removal takes what the stopped one left aside
    assert not aside.exists()
