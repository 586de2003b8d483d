"""Online rounds with the tiny model (`rlhf run --run.rounds 2`): round 2 labels the round-1 policy's answers to
fresh prompts where the round-1 reward model is least sure, within its budget; its reward model trains on both
rounds' votes; PPO and DPO continue; a run killed in round 2 reruns to an uninterrupted run's artifacts; a setting
changed for round 2 leaves round 1 done; and a round labelled by people waits for the app's votes, killed or not."""
import itertools
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from sqlalchemy import select

from preference_ui.loadtest import BrowserLikeClient, free_port, stop_server, wait_for_port
from rlhf.reward_model import load_reward_model, reward_tokenizer, score
from rlhf.runs import hash_path
from rlhf.store import Prompt, Response, Store
from tests.conftest import REPO
from tests.test_run import assert_same_artifacts, run_ok, run_until

BUDGET = 6  # round 2 labels 6 of the round-1 policy's candidate pairs
ROUND_1 = ["sft", "preferences", "reward", "ppo", "dpo", "eval"]
ROUND_2 = [f"round-2/{stage}" for stage in ROUND_1[1:]]


def rounds_run(root, name: str, *extra: str, config: str = "configs/tiny.yaml") -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", "--config", config, f"--run.output_root={root}",
            f"--run.name={name}", "--run.rounds=2", f"--preferences.round_budget={BUDGET}", *extra]


def actions(stdout: str) -> dict:
    """{manifest key: what `rlhf run` did with it}, from its first line about each."""
    found = {}
    for line in stdout.splitlines():
        key, _, what = line.removeprefix("[run] ").partition(": ")
        if line.startswith("[run] ") and key in ROUND_1 + ROUND_2:
            found.setdefault(key, what)
    return found


def rounds_document() -> dict:
    """configs/tiny.yaml with labellers who seldom tie: its length judge scores the tiny model's answers (most of
    them cut at max_new_tokens) alike, and round 2, which labels the pairs the reward model is least sure about,
    got 5 ties of 6, leaving it no decided pair to hold out on one draw."""
    document = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    document["preferences"].update(simulate_judge="tests.test_ppo_trainer:vowel_share", simulate_temperature=0.0)
    return document


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted two-round run."""
    root = tmp_path_factory.mktemp("rounds")
    config = root / "rounds.yaml"
    config.write_text(yaml.safe_dump(rounds_document()))
    printed = run_ok(rounds_run(root, "whole", config=str(config)))
    return {"root": root, "run": root / "whole", "printed": printed, "config": str(config)}


def test_round_2_labels_the_round_1_policy_where_its_reward_model_is_least_sure_and_trains_on_both_rounds(whole):
    run, printed = whole["run"], whole["printed"]
    assert actions(printed) == {key: "running" for key in ROUND_1 + ROUND_2}
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    assert all(manifest[key]["status"] == "done" for key in ROUND_1 + ROUND_2)
    store = Store(f"sqlite:///{run / 'labels.db'}")

    # round 2's comparisons: the round-1 PPO policy's answers to prompts round 1 never saw, BUDGET of them
    batch = manifest["round-2/preferences"]["metrics"]["batch"]
    assert batch.startswith("whole-round-2-")  # its own batch, keyed by what it was drawn from
    first, second = store.comparisons("whole"), store.comparisons(batch)
    assert len(second) == BUDGET
    assert {c["a_model"] for c in second} | {c["b_model"] for c in second} == {str(run / "ppo")}
    assert not {json.dumps(c["prompt"]) for c in first} & {json.dumps(c["prompt"]) for c in second}
    assert set(store.closed_batches()) == {"whole", batch}  # each round's batch closed once exported

    # ... and they are the candidate pairs the round-1 reward model was least sure about (smallest |gap|)
    with store.session() as session:
        answers = session.scalars(select(Response).where(Response.model == str(run / "ppo"))).all()
        conversations = [session.get(Prompt, answer.prompt_id).messages + [{"role": "assistant",
                                                                             "content": answer.text}]
                         for answer in answers]
    reward = str(run / "reward")
    tokenizer = reward_tokenizer(reward)
    scores = dict(zip(answers, score(load_reward_model(reward, tokenizer), tokenizer, conversations)))
    candidates = [(a, b) for a, b in itertools.combinations(answers, 2) if a.prompt_id == b.prompt_id
                  and a.text != b.text]
    gap = {frozenset((a.text, b.text)): abs(scores[a] - scores[b]) for a, b in candidates}
    chosen = {frozenset((c["a"], c["b"])) for c in second}
    assert len(gap) > BUDGET and chosen <= set(gap)
    assert max(gap[pair] for pair in chosen) <= min(gap[pair] for pair in gap if pair not in chosen) + 1e-5

    # round 2's reward model saw both rounds' votes, and measured the round-1 model on round 2's held-out votes
    entry = manifest["round-2/reward"]
    assert entry["inputs"]["preferences"] == str(run / "preferences")
    assert entry["inputs"]["preferences_round_2"] == str(run / "round-2" / "preferences")
    pairs = manifest["preferences"]["metrics"]["pairs"] + manifest["round-2/preferences"]["metrics"]["pairs"]
    ties = manifest["preferences"]["metrics"]["ties"] + manifest["round-2/preferences"]["metrics"]["ties"]
    metrics = entry["metrics"]
    # ties are dropped (reward.ties drop), and so are pairs longer than max_length (configs/tiny.yaml: 128 tokens)
    assert metrics["train_pairs"] + metrics["long_pairs_left_out"] + metrics["eval_pairs"] == pairs - ties
    assert metrics["new_round_eval_pairs"] >= 1 and "previous_model_new_round_accuracy" in metrics

    # PPO continues the round-1 policy and critic against the SFT model; DPO continues the round-1 DPO policy
    assert {k: manifest["round-2/ppo"]["inputs"][k] for k in ("policy", "critic", "reference", "reward_model")} == {
        "policy": str(run / "ppo"), "critic": str(run / "ppo" / "critic"), "reference": str(run / "sft"),
        "reward_model": str(run / "round-2" / "reward")}
    assert manifest["round-2/dpo"]["inputs"]["model"] == str(run / "dpo")
    assert manifest["round-2/dpo"]["inputs"]["preferences"] == str(run / "round-2" / "preferences")

    # every round evaluated; the run's report ends with the per-round table and plot
    report = (run / "report.md").read_text()
    assert "## Online rounds" in report and (run / "round-2" / "eval" / "rounds.png").exists()
    rows = [line for line in report[report.index("## Online rounds"):].splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["1", "2"]
    for round, folder in ((1, run / "eval"), (2, run / "round-2" / "eval")):
        ppo = json.loads((folder / "results.json").read_text())["policies"]["ppo"]
        assert f"{ppo['win_rate_judge']:.3f} [{ppo['win_rate_judge_low']:.3f}" in rows[round]
    assert "](round-2/eval/rounds.png)" in report


# Where round 2 run again is killed: right after its preferences published, and mid PPO after a checkpoint
KILLS = ["round-2/preferences/stage.json", "round-2/.ppo.partial/checkpoint-2/trainer_state.json"]


def test_a_run_killed_in_round_2_reruns_to_the_uninterrupted_runs_artifacts(whole, tmp_path):
    """Round 2 of the uninterrupted run again, its folder moved aside first: round 1 stays up to date, and the store
    keeps round 2's comparisons and votes, which the rerun finds (its batch is keyed by what it was drawn from)."""
    run = whole["run"]
    uninterrupted = tmp_path / "round-2"
    shutil.move(run / "round-2", uninterrupted)
    printed = [run_until(rounds_run(whole["root"], "whole", config=whole["config"]), run / trigger,
                         tmp_path / f"killed-{i}.log")
               for i, trigger in enumerate(KILLS)]
    assert f"already sampled: {BUDGET} comparisons" in printed[0], printed[0][-3000:]
    # killed after its folder was published: done, or (killed before the manifest said so) run again on the
    # comparisons and votes already in the store
    assert (actions(printed[1])["round-2/preferences"] == "up to date, skipped"
            or f"already sampled: {BUDGET} comparisons" in printed[1]), printed[1][-3000:]
    last = run_ok(rounds_run(whole["root"], "whole", config=whole["config"]))
    assert actions(last)["round-2/ppo"] == "resuming", last[-3000:]
    assert all(actions(last)[key] == "up to date, skipped" for key in ROUND_1 + ROUND_2[:2])

    assert_same_artifacts(run / "round-2", uninterrupted, ("reward", "ppo", "dpo"))


def test_a_setting_changed_for_round_2_reruns_round_2_only_and_leaves_round_1_as_it_was(whole, tmp_path):
    """After the killed run's test: it changes the uninterrupted run that test compares with."""
    root, run = whole["root"], whole["run"]
    round_1 = {stage: hash_path(run / stage) for stage in ROUND_1}
    document = rounds_document()
    document["round-2"] = {"ppo": {"learning_rate": 5.0e-4}}
    config = tmp_path / "round-2-ppo.yaml"
    config.write_text(yaml.safe_dump(document))
    # a round-2 section: round 2's PPO and what reads it (its eval) rerun; its DPO and round 1 do not
    changed = actions(run_ok(rounds_run(root, "whole", config=str(config))))
    assert [key for key, what in changed.items() if what == "running"] == ["round-2/ppo", "round-2/eval"], changed
    # a setting read by later rounds only (round 1 does not hash it): every round-2 stage reruns, round 1 does not;
    # round 2 draws a new batch of 4 (the first one, and its votes, stay in the store)
    before = json.loads((run / "manifest.json").read_text())["stages"]["round-2/preferences"]["metrics"]["batch"]
    changed = actions(run_ok(rounds_run(root, "whole", "--preferences.round_budget=4", config=str(config))))
    assert [key for key, what in changed.items() if what == "running"] == ROUND_2, changed
    assert {stage: hash_path(run / stage) for stage in ROUND_1} == round_1
    after = json.loads((run / "manifest.json").read_text())["stages"]["round-2/preferences"]["metrics"]["batch"]
    store = Store(f"sqlite:///{run / 'labels.db'}")
    assert after != before and len(store.comparisons(after)) == 4 and len(store.comparisons(before)) == BUDGET


def test_a_round_labelled_by_people_waits_for_the_apps_votes_through_a_kill_and_then_finishes(whole, tmp_path):
    """After the setting-changed test, on the uninterrupted run's round 1: round 2, now labelled by people in a
    batch of their own, reruns and waits for their votes."""
    run = whole["run"]
    document = rounds_document()
    document["round-2"] = {"preferences": {"simulate_judge": "", "poll_seconds": 0.2, "batch": "people"}}
    config = tmp_path / "people-in-round-2.yaml"
    config.write_text(yaml.safe_dump(document))
    command = rounds_run(whole["root"], "whole", config=str(config))
    published = hash_path(run / "round-2" / "preferences")  # by the simulated labellers, before this test
    log = tmp_path / "run.log"

    def started_run():
        with log.open("a") as out:
            return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def wait_for(text: str, process) -> None:
        deadline = time.time() + 600
        while text not in log.read_text():
            assert process.poll() is None, f"the run ended before '{text}':\n{log.read_text()[-3000:]}"
            assert time.time() < deadline
            time.sleep(0.1)

    runs = [started_run()]  # the `rlhf run` processes, stopped at the end whatever happens
    server = None
    try:
        wait_for("waiting for labellers: 0/6", runs[-1])
        db = f"sqlite:///{run / 'labels.db'}"
        serve = log.read_text().split(f"rlhf label --db {db} serve --batch ")[1]
        batch = serve.split()[0].rstrip("`")
        assert batch.startswith("people-round-2-")  # the round's own batch is what the app is told to hand out
        Store(db).add_user("ann", "labeller", "ann-passphrase")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "label", "--db", db, "serve", "--batch",
                                   batch, "--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.STDOUT)
        wait_for_port(server, port)
        ann = BrowserLikeClient(f"http://127.0.0.1:{port}", "ann", "ann-passphrase")
        ann.call("next_item")
        for _ in range(3):
            ann.call("vote_a", "clear", "", "", "", None)  # (no page label: not checked)
        runs[-1].send_signal(signal.SIGKILL)  # killed while it waits for the other three
        runs[-1].wait()
        assert hash_path(run / "round-2" / "preferences") == published  # the killed attempt overwrote nothing
        runs.append(started_run())
        wait_for("waiting for labellers: 3/6", runs[-1])
        ann = BrowserLikeClient(f"http://127.0.0.1:{port}", "ann", "ann-passphrase")  # back at the app later
        ann.call("next_item")
        for _ in range(3):
            ann.call("vote_b", "clear", "", "", "", None)  # (no page label: not checked)
        assert runs[-1].wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        for process in runs:  # a failed test leaves no run waiting for votes
            if process.poll() is None:
                process.kill()
                process.wait()
        if server is not None:
            stop_server(server)
    printed = log.read_text()
    rerun = printed[printed.rindex("[run] sft: "):]
    assert actions(rerun) == {**{key: "up to date, skipped" for key in ROUND_1}, **{key: "running" for key in ROUND_2}}
    entry = json.loads((run / "manifest.json").read_text())["stages"]["round-2/preferences"]
    assert entry["status"] == "done" and entry["metrics"]["votes"] == 6 and entry["metrics"]["batch"] == batch


def test_each_round_takes_fresh_prompts_and_a_prompt_file_too_short_for_a_round_is_named(tmp_path):
    """A round starts after the prompts the previous round's stage recorded as taken, so a round-R section that
    changes round_prompts never hands a later round prompts an earlier one saw."""
    from preference_ui.collect import prompts_taken_before, round_prompts
    from preference_ui.config import PreferencesStageConfig
    from rlhf.config import RunConfig
    from rlhf.errors import ConfigError, DataError
    from rlhf.runs import STAGE_RECORD

    rows = [{"id": str(i)} for i in range(12)]
    config = PreferencesStageConfig(prompts="p.jsonl", num_prompts=4, round_prompts=3)
    runs = {round: RunConfig(name="r", output_root=str(tmp_path), round=round) for round in (1, 2, 3, 4)}
    assert [prompts_taken_before(runs[round], config) for round in (1, 2, 3)] == [0, 4, 7]  # nothing recorded yet
    round_2 = runs[2].directory().stage_path("preferences")
    round_2.mkdir(parents=True)
    (round_2 / STAGE_RECORD).write_text('{"prompts_taken": 9}')  # round 2 took 5 (its own round_prompts)
    taken = [[row["id"] for row in round_prompts(rows, config, round, prompts_taken_before(runs[round], config))]
             for round in (1, 2, 3)]
    assert taken == [["0", "1", "2", "3"], ["4", "5", "6"], ["9", "10", "11"]]
    with pytest.raises(DataError, match=r"p.jsonl: rows: round 4 takes prompts 13-15 .* but the file has 12"):
        round_prompts(rows, config, 4, 12)
    with pytest.raises(ConfigError, match="num_prompts is 0: round 1 takes every prompt"):
        round_prompts(rows, PreferencesStageConfig(), 2)


def test_rlhf_run_refuses_rounds_without_the_stages_a_round_needs(tmp_path):
    from pipeline.run import main
    from rlhf.errors import UserError

    document = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config = tmp_path / "no-reward.yaml"
    config.write_text(yaml.safe_dump({name: document[name] for name in ("run", "sft", "preferences", "ppo")}))
    with pytest.raises(UserError, match="online rounds need the preferences and reward sections .* reward"):
        main(str(config), [f"--run.output_root={tmp_path}", "--run.rounds=2"])
    # what a later round would refuse when it came, after round 1 had trained: refused before round 1 starts
    no_ppo = tmp_path / "no-ppo.yaml"
    no_ppo.write_text(yaml.safe_dump({name: document[name] for name in ("run", "sft", "preferences", "reward", "dpo")}))
    for path, words, message in (
            (no_ppo, [], "preferences.round_policy is ppo, but this run has no ppo stage: .* set "
                         "preferences.round_policy to dpo"),
            (REPO / "configs" / "tiny.yaml", ["--reward.preferences=data/gold_comparisons.jsonl"],
             "reward.preferences is set, but online round 2 trains on every round's own votes"),
            (REPO / "configs" / "tiny.yaml", ["--dpo.preferences=data/gold_comparisons.jsonl"],
             r"dpo.preferences is set, but online round 2 trains on the round's own pairs \(round-2/preferences\)")):
        with pytest.raises(UserError, match=message):
            main(str(path), [f"--run.output_root={tmp_path}", "--run.rounds=2", *words])
    other_split = tmp_path / "other-split.yaml"  # round 2 continues round 1's reward model on another split
    other_split.write_text(yaml.safe_dump({**document, "reward": {**document["reward"], "round_init": "previous"},
                                           "round-2": {"reward": {"seed": 7}}}))
    with pytest.raises(UserError, match="reward.seed is 7 in round 2 and was"):
        main(str(other_split), [f"--run.output_root={tmp_path}", "--run.rounds=2"])
    in_the_file = tmp_path / "round-in-file.yaml"
    in_the_file.write_text(yaml.safe_dump({**document, "run": {**document["run"], "round": 2}}))
    with pytest.raises(UserError, match="run.round: rlhf run sets the round for each round itself"):
        main(str(in_the_file), [f"--run.output_root={tmp_path}"])
    assert not (tmp_path / "tiny").exists()


def test_a_ppo_policy_published_without_its_critic_is_named_with_the_command_that_remakes_it(tmp_path):
    from ppo.config import PPOStageConfig
    from ppo.trainer import critic_free_before, earlier_critic, inputs
    from rlhf.config import RunConfig
    from rlhf.errors import MissingInputError
    from rlhf.runs import RunDir

    round_3 = RunDir(tmp_path, "r", 3)
    assert earlier_critic(round_3) == str(tmp_path / "r" / "round-2" / "ppo" / "critic")  # no policy: said apart
    (tmp_path / "r" / "round-2" / "ppo").mkdir(parents=True)
    (tmp_path / "r" / "round-2" / "ppo" / "config.json").write_text("{}")
    with pytest.raises(MissingInputError, match=r"no critic in .*round-2/ppo: .* `rlhf run --from round-2/ppo ...`"):
        earlier_critic(round_3)
    # a critic-free round 2 kept none to continue: round 3's PPO critic starts from its reward model (the advice
    # above republished a policy without one again)
    assert not critic_free_before(round_3)
    RunDir(tmp_path, "r", 2).record("ppo", config={"algorithm": "rloo"})
    assert critic_free_before(round_3)
    (tmp_path / "r" / "sft").mkdir()
    (tmp_path / "r" / "sft" / "config.json").write_text("{}")
    (tmp_path / "r" / "round-3" / "reward").mkdir(parents=True)
    (tmp_path / "r" / "round-3" / "reward" / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    found = inputs(PPOStageConfig(), RunConfig(name="r", output_root=str(tmp_path), round=3, rounds=3))
    assert "critic" not in found and found["reward_model"] == str(tmp_path / "r" / "round-3" / "reward")


def test_a_reward_model_continued_from_the_previous_round_keeps_that_rounds_split(tmp_path):
    """With round_init previous, another seed or held-out share in round 2 held out pairs the model had trained on
    in round 1, and its held-out accuracy read them as unseen."""
    import dataclasses

    from reward.config import RewardStageConfig
    from reward.train import check_same_split
    from rlhf.config import RunConfig
    from rlhf.errors import ConfigError
    from rlhf.runs import RunDir

    RunDir(tmp_path, "r").record("reward", config={"seed": 42, "eval_fraction": 0.2, "ties": "drop",
                                                   "selection": "all"})
    run = RunConfig(name="r", output_root=str(tmp_path), round=2, rounds=2)
    continued = RewardStageConfig(round_init="previous", seed=42, eval_fraction=0.2)
    check_same_split(continued, run)
    with pytest.raises(ConfigError, match="reward.eval_fraction is 0.3 in round 2 and was 0.2 in round 1"):
        check_same_split(dataclasses.replace(continued, eval_fraction=0.3), run)
    check_same_split(dataclasses.replace(continued, eval_fraction=0.3, round_init="sft"), run)  # a new model: any
