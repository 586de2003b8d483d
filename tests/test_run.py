"""`rlhf run` on configs/tiny.yaml: the whole chain end to end with simulated labellers, a rerun that skips what is
up to date, a changed config that reruns only what depends on it, `--from`, and a run killed again and again (in
every stage, between stages, while the report is written) that, rerun, ends with an uninterrupted run's artifacts."""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
import yaml
from datasets import load_from_disk
from safetensors.torch import load_file

from pipeline.cli import main as cli
from preference_ui.loadtest import BrowserLikeClient, free_port, item_label, stop_server, wait_for_port
from rlhf.store import Store
from tests.conftest import REPO

STAGES = ["sft", "preferences", "reward", "ppo", "dpo", "eval"]


def rlhf_run(root, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", "--config", "configs/tiny.yaml",
            f"--run.output_root={root}", f"--run.name={name}", *extra]


def run_ok(command: list[str], env: dict | None = None) -> str:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def actions(stdout: str) -> dict:
    """{stage: 'running' | 'resuming' | 'up to date, skipped'} from the first [run] line of each stage."""
    found = {}
    for line in stdout.splitlines():
        stage, _, what = line.removeprefix("[run] ").partition(": ")
        if line.startswith("[run] ") and stage in STAGES:
            found.setdefault(stage, what)
    return found


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run, tracked to a trackio folder of its own (tracking is no input: the killed runs, which
    track nothing, must still end with its artifacts)."""
    root = tmp_path_factory.mktemp("run")
    trackio = root / "trackio"
    env = {**os.environ, "TRACKIO_DIR": str(trackio), "HF_HUB_OFFLINE": "1"}
    printed = run_ok(rlhf_run(root, "tiny", "--run.tracking", "trackio"), env)
    return {"root": root, "run": root / "tiny", "printed": printed, "trackio": trackio}


def test_a_tiny_run_end_to_end_tracks_every_stage_and_its_store_serves_the_label_app(whole, tmp_path):
    first, run, trackio = whole["printed"], whole["run"], whole["trackio"]
    assert actions(first) == {stage: "running" for stage in STAGES}
    [database] = list(trackio.rglob("*.db"))
    with sqlite3.connect(database) as db:
        runs = {name for (name,) in db.execute("select distinct run_name from metrics")}
        logged = " ".join(str(row) for (row,) in db.execute("select metrics from metrics"))
    assert runs >= {f"tiny-{stage}" for stage in STAGES}, runs
    assert all(f"eval/{plot}" in logged for plot in ("training_curves", "reward_vs_kl", "score_distribution"))
    assert all(f"train/final_{key}" in logged for key in ("eval_score_after", "final_kl", "kl_budget"))  # PPO's too
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    assert all(manifest[stage]["status"] == "done" for stage in STAGES)
    assert manifest["preferences"]["metrics"]["pairs"] > 0 and (run / "labels.db").exists()
    # the label commands given the same config use the run's own store
    config = tmp_path / "tiny-here.yaml"
    document = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    document["run"].update(output_root=str(whole["root"]), name="tiny")
    config.write_text(yaml.safe_dump(document))
    store = Store(f"sqlite:///{run / 'labels.db'}")
    label = [sys.executable, "-m", "pipeline.cli", "label"]
    assert f"{len(store.comparisons())} comparisons" in run_ok([*label, "stats", "--config", str(config)])
    added = subprocess.run([*label, "users", "add", "ann", "--config", str(config)], cwd=REPO, input="ann-passphrase\n",
                           capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr
    port = free_port()
    server = subprocess.Popen([*label, "serve", "--config", str(config), "--port", str(port)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_port(server, port)
        ann = BrowserLikeClient(f"http://127.0.0.1:{port}", "ann", "ann-passphrase")
        assert ann.call("next_item")[1] == "### Nothing left to label"  # the batch is exported: closed
        store.reopen_batch("tiny")  # as a rerun with more votes wanted does
        _, title, *_ = BrowserLikeClient(f"http://127.0.0.1:{port}", "ann", "ann-passphrase").call("next_item")
    finally:
        stop_server(server)
    assert item_label(title) in {store.item_label(comparison["id"]) for comparison in store.comparisons()}

    # the report's headline table is the eval stage's numbers, and `rlhf run` prints it last
    results = json.loads((run / "eval" / "results.json").read_text())["policies"]
    report = (run / "report.md").read_text()
    for policy in ("sft", "ppo", "dpo"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {policy} |"))
        assert f"{results[policy]['reward']:.3f}" in row and f"{results[policy]['kl']:.3f}" in row
        assert manifest["eval"]["metrics"][f"{policy}/reward"] == results[policy]["reward"]
        assert row in first

    timings = first[first.index("[run] wall time of the stages run now:"):].splitlines()[1:len(STAGES) + 2]
    assert [line.split()[0] for line in timings] == STAGES + ["total"]


# Where a run is killed, in order: each file's appearance under the run folder triggers a SIGKILL of `rlhf run`
# (its stage process dies with it), then the run is started again. Mid-stage after a checkpoint, while sampling
# or voting, right after a stage published its output, and while the report is being written.
KILLS = [".sft.partial/checkpoint-3/trainer_state.json", "labels.db", "preferences/stage.json",
         ".reward.partial/checkpoint-10/trainer_state.json", ".ppo.partial/checkpoint-2/trainer_state.json",
         ".dpo.partial/checkpoint-4/trainer_state.json", ".eval.partial"]


def assert_same_artifacts(killed, uninterrupted, stages) -> None:
    """The same votes on the same answers (batch names aside: each run names its batch after itself), the same
    weights of each of `stages`, and the same eval numbers."""
    killed_pairs, whole_pairs = ([{k: v for k, v in row.items() if k != "batch"}
                                  for row in load_from_disk(str(folder / "preferences"))]
                                 for folder in (killed, uninterrupted))
    assert killed_pairs == whole_pairs
    for stage in stages:
        killed_weights = load_file(killed / stage / "model.safetensors")
        for name, tensor in load_file(uninterrupted / stage / "model.safetensors").items():
            assert torch.allclose(killed_weights[name], tensor, atol=1e-5), (stage, name)
    killed_results, whole_results = (json.loads((folder / "eval" / "results.json").read_text())["policies"]
                                     for folder in (killed, uninterrupted))
    for policy, result in whole_results.items():
        for key, value in result.items():
            if isinstance(value, float):
                assert killed_results[policy][key] == pytest.approx(value, abs=1e-4), (policy, key)


def run_until(command: list[str], trigger, log, stop: int = signal.SIGKILL) -> str:
    """Starts `rlhf run` (`command`), sends it `stop` as soon as `trigger` exists; returns what it printed (kept in
    `log`). A run sent SIGTERM must exit as the signal would (143) within two minutes; it is started with SIGINT
    ignored, as a script's `rlhf run ... &` is (the SIGINT it passes on must still stop its stage). On a failed
    assertion no run is left behind."""
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if stop == signal.SIGTERM else None
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, preexec_fn=ignore_sigint)
        try:
            deadline = time.time() + 600
            while not trigger.exists():
                assert process.poll() is None, f"the run ended before {trigger} appeared:\n{log.read_text()[-3000:]}"
                assert time.time() < deadline
                time.sleep(0.02)
            process.send_signal(stop)
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert stop == signal.SIGKILL or code == 128 + stop, log.read_text()[-3000:]
    return log.read_text()


def test_a_run_killed_again_and_again_at_every_stage_reruns_to_the_same_artifacts(whole, tmp_path):
    """The stop while labelling is a SIGTERM (a scheduler's stop, `timeout`): `rlhf run` passes it on to the stage
    as one SIGINT and waits, so the stage records its attempt as failed (not left "running") before the run exits
    143. (Its store is made before its answers are sampled: the stage has seconds of work left.) The others are
    SIGKILLs."""
    printed = []
    for i, trigger in enumerate(KILLS):
        stop = signal.SIGTERM if trigger == "labels.db" else signal.SIGKILL
        printed.append(run_until(rlhf_run(tmp_path, "killed"), tmp_path / "killed" / trigger,
                                 tmp_path / f"killed-{i}.log", stop))
        if stop == signal.SIGTERM:
            assert "error: SIGTERM: stage preferences was stopped (its attempt is recorded as failed)" in printed[-1]
            assert "[run] wall time of the stages run now:\n  sft " in printed[-1]  # resumed, and finished
            entry = json.loads((tmp_path / "killed" / "manifest.json").read_text())["stages"]["preferences"]
            assert entry["status"] == "failed" and entry["error"].startswith("KeyboardInterrupt"), entry
    # each training stage killed after its checkpoint resumes from it in the next run
    for stage in ("sft", "reward", "ppo", "dpo"):
        killed_in = next(i for i, trigger in enumerate(KILLS) if trigger.startswith(f".{stage}.partial/checkpoint"))
        assert f"[run] {stage}: resuming" in printed[killed_in + 1], printed[killed_in + 1][-3000:]
    last = actions(run_ok(rlhf_run(tmp_path, "killed")))
    assert last == {**{stage: "up to date, skipped" for stage in STAGES[:-1]}, "eval": "running"}

    killed, uninterrupted = tmp_path / "killed", whole["run"]
    assert_same_artifacts(killed, uninterrupted, ("sft", "reward", "ppo", "dpo"))
    killed_tables, whole_tables = ([line for line in (folder / "report.md").read_text().splitlines()
                                    if line.startswith("|")] for folder in (killed, uninterrupted))
    assert killed_tables == whole_tables


def test_a_rerun_skips_what_is_up_to_date_and_a_change_reruns_only_what_depends_on_it(whole):
    """After the killed run's test: it changes the uninterrupted run that test compares with."""
    root = whole["root"]
    report = (root / "tiny" / "report.md").read_text()
    (root / "tiny" / "report.md").write_text("an eval attempt killed before it published wrote this")
    manifest_path = root / "tiny" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["stages"]["sft"]["code_version"] = "0000000"  # as if another version of the code had made it
    manifest_path.write_text(json.dumps(manifest))
    # working folders: the finished DPO attempt's own, left by a kill between recording itself done and removing
    # it (removed: the stage, up to date, never runs again), and another attempt's, to resume (kept)
    from rlhf.runs import work_key

    dpo_entry = manifest["stages"]["dpo"]
    for stage, key in (("dpo", work_key(dpo_entry["config_hash"], dpo_entry["input_hashes"])),
                       ("reward", "another attempt's key")):
        (root / "tiny" / f".{stage}.partial" / "checkpoint-4").mkdir(parents=True)
        (root / "tiny" / f".{stage}.partial" / "work_key").write_text(key)
    rerun = run_ok(rlhf_run(root, "tiny"))
    assert not (root / "tiny" / ".dpo.partial").exists()
    assert (root / "tiny" / ".reward.partial" / "checkpoint-4").is_dir()
    shutil.rmtree(root / "tiny" / ".reward.partial")
    sft_line = next(line for line in rerun.splitlines() if line.startswith("[run] sft: "))
    assert sft_line.startswith("[run] sft: up to date, skipped (made by code 0000000, the code is now ")
    assert sft_line.endswith(": --from sft reruns it)")
    assert actions(rerun) == {stage: "up to date, skipped" for stage in STAGES} | {"sft": sft_line[len("[run] sft: "):]}
    assert "[run] every stage was up to date" in rerun
    assert (root / "tiny" / "report.md").read_text() == report  # the published eval's, again
    # a new reward learning rate: the reward model changes, so PPO and eval (which read it) rerun; DPO does not
    changed = actions(run_ok(rlhf_run(root, "tiny", "--reward.learning_rate", "1e-3")))
    assert [s for s in STAGES if changed[s] == "running"] == ["reward", "ppo", "eval"], changed
    forced = actions(run_ok(rlhf_run(root, "tiny", "--reward.learning_rate", "1e-3", "--from", "dpo")))
    assert [s for s in STAGES if forced[s] == "running"] == ["dpo", "eval"], forced
    # SFT again, to the same weights: the folder's own record keeps no timings (the manifest does), so its content
    # hash is the same, and the preferences batch drawn from it is still this model's (it was refused as drawn
    # from another model)
    from rlhf.runs import hash_path

    sft_hash = hash_path(root / "tiny" / "sft")
    stage = [sys.executable, "-m", "pipeline.cli", "--config", "configs/tiny.yaml", f"--run.output_root={root}",
             "--run.name=tiny", "--run.tracking=none"]
    run_ok([*stage[:3], "sft", *stage[3:], "--sft.resume=false"])
    assert hash_path(root / "tiny" / "sft") == sft_hash
    assert "real_tokens_per_s" in json.loads(manifest_path.read_text())["stages"]["sft"]["metrics"]
    assert "already sampled" in run_ok([*stage[:3], "preferences", *stage[3:]])


def test_the_human_label_wait_resumes_where_it_was_and_exports_once_every_comparison_has_its_votes(
        tmp_path, tiny_model_path):
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    command = [sys.executable, "-m", "pipeline.cli", "preferences", "--config", "configs/tiny.yaml",
               f"--run.output_root={tmp_path}", f"--preferences.model={tiny_model_path}", f"--preferences.db={db}",
               "--preferences.simulate_judge=", "--preferences.num_prompts=4", "--preferences.max_new_tokens=6",
               "--preferences.poll_seconds=0.2"]
    store = Store(db)
    people = [store.add_user(name, "labeller", f"password-of-{name}") for name in ("ann", "bob")]

    def wait_for(condition, process):
        deadline = time.time() + 300
        while not condition():
            assert process.poll() is None, "collect ended while waiting for votes"
            assert time.time() < deadline
            time.sleep(0.1)

    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(store.comparisons("tiny")) == 4, first)
    comparisons = store.comparisons("tiny")
    for comparison in comparisons[:2]:
        store.cast_vote(comparison["id"], people[0], "a")
    time.sleep(0.5)
    first.send_signal(signal.SIGKILL)  # interrupted while waiting for the last two
    first.wait()
    assert not (tmp_path / "tiny" / "preferences").exists()

    second = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    while not any("waiting for labellers" in line for line in seen):  # still waiting: two comparisons lack votes
        seen.append(second.stdout.readline())
        assert seen[-1] or second.poll() is None, "".join(seen)[-3000:]
    assert "waiting for labellers: 2/4" in seen[-1]
    for comparison in comparisons[2:]:
        store.cast_vote(comparison["id"], people[1], "b")
    output = "".join(seen) + second.communicate(timeout=300)[0]
    assert second.returncode == 0, output[-3000:]
    assert "already sampled: 4 comparisons" in output
    assert [c["id"] for c in store.comparisons("tiny")] == [c["id"] for c in comparisons]  # nothing resampled
    entry = json.loads((tmp_path / "tiny" / "manifest.json").read_text())["stages"]["preferences"]
    assert entry["status"] == "done" and entry["metrics"]["pairs"] == 4 and entry["metrics"]["votes"] == 4

    # two votes each asked for: the batch is reopened and waited on until an admin closes it by hand, then the
    # comparisons that have two are exported
    third = subprocess.Popen(command + ["--preferences.min_votes=2"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    seen = []
    while not any("waiting for labellers: 0/4" in line for line in seen):
        seen.append(third.stdout.readline())
        assert seen[-1] or third.poll() is None, "".join(seen)[-3000:]
    assert "tiny" not in store.closed_batches()
    assert any("batch 'tiny' was exported and closed at " in line and "reopening it" in line for line in seen)
    store.cast_vote(comparisons[0]["id"], people[1], "a")
    assert cli(["label", "--db", db, "close", "tiny"]) == 0
    output = third.communicate(timeout=300)[0]
    assert third.returncode == 0, output[-3000:]
    assert "batch 'tiny' was closed by hand: exporting the 1/4 comparisons with 2 vote(s)" in output
    entry = json.loads((tmp_path / "tiny" / "manifest.json").read_text())["stages"]["preferences"]
    assert entry["status"] == "done" and entry["metrics"]["pairs"] == 1

    # a hand close holds until an admin reopens the batch: a stage asking for three votes a comparison, from
    # simulated labellers now, casts none and exports the comparisons that have them (none: exit 2), and the
    # finished stage stays as it was
    votes = len(store.votes())
    fourth = subprocess.run(command + ["--preferences.min_votes=3", "--preferences.simulate_judge=builtin:length",
                                      "--preferences.simulate_labellers=3"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert fourth.returncode == 2, fourth.stdout[-3000:] + fourth.stderr[-3000:]
    assert "batch 'tiny' was closed by hand: exporting the comparisons that have 3 vote(s)" in fourth.stdout
    assert "before any comparison had 3 vote(s)" in fourth.stderr and "tiny" in store.closed_by_hand()
    assert len(store.votes()) == votes
    after = json.loads((tmp_path / "tiny" / "manifest.json").read_text())["stages"]["preferences"]
    assert after.pop("attempt")["status"] == "failed" and after == entry  # the failed attempt kept apart


def test_the_accelerate_launcher_starts_training_stages_under_accelerate_launch(tmp_path):
    """A one-process CPU accelerate config (several CPU processes would need mpirun): the SFT stage goes through
    `accelerate launch --config_file`, which exports its settings to the stage (ACCELERATE_* variables)."""
    import yaml

    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config = tmp_path / "sft-only.yaml"
    config.write_text(yaml.safe_dump({"run": tiny["run"], "sft": tiny["sft"]}))
    launcher = tmp_path / "cpu.yaml"
    launcher.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO",
                                        "num_processes": 1, "num_machines": 1, "use_cpu": True,
                                        "mixed_precision": "no"}))
    command = [sys.executable, "-m", "pipeline.cli", "run", "--config", str(config), f"--run.output_root={tmp_path}",
               "--launcher", "accelerate", "--accelerate_config", str(launcher)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert actions(result.stdout) == {"sft": "running"}
    assert "accelerate.commands.launch --config_file" in result.stdout
    assert json.loads((tmp_path / "tiny" / "manifest.json").read_text())["stages"]["sft"]["status"] == "done"
    refused = subprocess.run(command[:-2], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--accelerate_config FILE" in refused.stderr


def test_a_stage_rlhf_run_started_through_a_launcher_dies_with_the_launcher(tmp_path):
    """rlhf run -> a launcher (accelerate launch, torchrun) -> the stage: rlhf run kills its child, the launcher,
    when it dies; the stage, the launcher's child, must die with it (it held the stage lock and trained on, and a
    rerun stopped at "already running"). Here the launcher is a plain process that writes nowhere the stage's
    output could break."""
    import psutil

    from rlhf.runs import RunDir, stage_lock

    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config = tmp_path / "sft-only.yaml"
    config.write_text(yaml.safe_dump({"run": tiny["run"], "sft": {**tiny["sft"], "max_steps": 100_000}}))
    launch = ("import subprocess, sys; "
              "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)")
    launcher = subprocess.Popen([sys.executable, "-c", launch, sys.executable, "-m", "pipeline.cli", "sft", "--config",
                                 str(config), f"--run.output_root={tmp_path}"], cwd=REPO,
                                env={**os.environ, "RLHF_STAGE_OF_A_RUN": "1"})
    deadline = time.time() + 300
    while not (tmp_path / "tiny" / ".sft.partial" / "work_key").exists():  # the stage holds its lock, and trains
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.1)
    [stage] = psutil.Process(launcher.pid).children()
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    try:
        stage.wait(timeout=30)
        with stage_lock(RunDir(tmp_path, "tiny"), "sft"):  # free again: a rerun can start
            pass
    finally:
        if stage.is_running():
            stage.kill()


def test_rlhf_run_starts_a_stage_afresh_when_it_decided_so_whatever_resume_the_config_says(tmp_path):
    """`sft: {resume: true}` in the config, and checkpoints of another attempt (another work key) in the working
    folder: rlhf run starts SFT afresh, as it decided, instead of continuing those checkpoints."""
    import yaml

    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config = tmp_path / "sft-only.yaml"
    config.write_text(yaml.safe_dump({"run": tiny["run"], "sft": {**tiny["sft"], "resume": True}}))
    foreign = tmp_path / "tiny" / ".sft.partial"
    (foreign / "checkpoint-3").mkdir(parents=True)
    (foreign / "checkpoint-3" / "trainer_state.json").write_text("{}")  # not a checkpoint this config made
    (foreign / "work_key").write_text("another attempt's settings")
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", str(config),
                             f"--run.output_root={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert actions(result.stdout) == {"sft": "running"} and "--sft.resume=false" in result.stdout
    assert "resuming from" not in result.stdout


def test_rlhf_run_refuses_a_missing_accelerate_config_a_round_of_its_own_and_a_fixed_reward_model_at_once(
        tmp_path, capsys):
    from pipeline.cli import main as cli

    common = ["run", "--config", "configs/tiny.yaml", f"--run.output_root={tmp_path}"]
    assert cli([*common, "--launcher", "accelerate", "--accelerate_config", str(tmp_path / "nope.yaml")]) == 2
    assert f"{tmp_path / 'nope.yaml'}: no such file (--accelerate_config)" in capsys.readouterr().err
    assert cli([*common, "--run.round", "2"]) == 2  # every stage, SFT too, would have run as round 2
    assert "rlhf run sets --run.round for each round itself" in capsys.readouterr().err
    assert cli([*common, "--run.rounds", "2", "--ppo.reward_model", str(tmp_path)]) == 2  # not after round 1
    assert "ppo.reward_model is set, but online round 2 trains against its own reward model" in \
        capsys.readouterr().err
    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    unused = [({**tiny, "round-3": {"ppo": {"learning_rat": 1e-5}}}, "learning_rat"),  # a round not run now
              ({"run": tiny["run"], "sft": tiny["sft"], "round-2": {"dpo": {"beta": 0.2}}},
               "round-2.dpo: the run has no 'dpo' section")]
    for document, message in unused:  # a typo in a round not run now; settings no round would use
        config = tmp_path.parent / "unused-round.yaml"
        config.write_text(yaml.safe_dump(document))
        assert cli(["run", "--config", str(config), f"--run.output_root={tmp_path}", "--run.rounds", "2"]) == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_stage_times_read_in_minutes_and_whole_seconds():
    from pipeline.run import minutes

    assert [minutes(s) for s in (0.4, 59.6, 119.6, 779.3)] == ["0 s", "1 min 0 s", "2 min 0 s", "12 min 59 s"]


def test_a_signal_that_comes_as_a_stage_ends_well_stops_the_run_and_leaves_the_stage_done(tmp_path, monkeypatch,
                                                                                          capsys):
    """SIGTERM reaching `rlhf run` after its stage has recorded itself done, but before the stage's process was
    seen to end (a window too short to hit on purpose, so the stage's process is replaced here): the run stops
    before the next stage and says the stage finished, not that it was stopped."""
    import pipeline.run
    from pipeline.cli import main as cli

    monkeypatch.setattr(pipeline.run, "stage_process", lambda argv: (0, signal.SIGTERM))
    assert cli(["run", "--config", "configs/tiny.yaml", f"--run.output_root={tmp_path}"]) == 143
    printed = capsys.readouterr()
    assert "[run] sft: finished in" in printed.out and "[run] preferences" not in printed.out
    assert "[run] wall time of the stages run now:\n  sft " in printed.out
    assert "SIGTERM: stopped after stage sft finished; rerun `rlhf run` to go on" in printed.err


def test_a_second_rlhf_run_of_the_same_run_stops_at_once_and_sigint_stops_a_run_started_in_the_background(
        tmp_path, capsys):
    """Two `rlhf run`s of one run each decided stage by stage what was up to date and took turns republishing each
    other's stages: the second now stops before its first stage. And a run started in the background from a
    script (SIGINT ignored, as the shell leaves it) takes SIGINT between stages again (it went on to its end)."""
    from pipeline.cli import main as cli
    from rlhf.runs import RunDir, run_lock

    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with run_lock(RunDir(tmp_path, "tiny")):
            assert cli(["run", "--config", "configs/tiny.yaml", f"--run.output_root={tmp_path}"]) == 2
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert f"run 'tiny' in {tmp_path} is already being run by another `rlhf run`" in capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "tiny").iterdir()) == [".run.lock"]
