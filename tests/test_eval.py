"""`rlhf eval`: win rates and intervals by hand, the KL along answers, and the report of a tiny run whose numbers
match the stage's metrics."""
import errno
import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from evaluation.metrics import answer_kl, bootstrap_interval, distinct_ngram_share, kl_per_position, win_rate
from pipeline.cli import main as cli
from rlhf.models import load_causal_lm
from rlhf.reward_model import reward_tokenizer
from rlhf.runs import RunDir
from tests.conftest import REPO


def test_win_rate_counts_ties_as_half_and_its_interval_narrows_with_more_prompts():
    assert win_rate([1.0, 2.0, 0.5, 3.0], [0.0, 2.0, 1.0, 1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    few = bootstrap_interval([1.0, 0.0] * 5, [0.5] * 10, resamples=2000, confidence=0.95, seed=0)
    many = bootstrap_interval([1.0, 0.0] * 200, [0.5] * 400, resamples=2000, confidence=0.95, seed=0)
    assert few[0] < 0.5 < few[1] and many[0] < 0.5 < many[1]
    assert many[1] - many[0] < (few[1] - few[0]) / 2
    # the normal approximation's half-width for 400 fair coin flips is 1.96 * 0.5 / 20 = 0.049
    assert (many[1] - many[0]) / 2 == pytest.approx(0.049, abs=0.01)


def words(prompts: list[str], answers: list[str]) -> list[float]:
    return [float(len(answer.split())) for answer in answers]


def test_the_human_win_rates_wilson_interval_stays_open_after_one_vote():
    from preference_ui.stats import wilson_interval

    assert wilson_interval(1.0, 1) == pytest.approx((0.2065, 1.0), abs=1e-4)  # the normal approximation: [1, 1]
    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)


def test_distinct_4gram_share_by_hand():
    assert distinct_ngram_share([1, 2, 3, 4, 5, 6]) == 1.0  # three 4-grams, none repeated
    assert distinct_ngram_share([1, 2, 3, 4] * 3) == pytest.approx(4 / 9)  # 9 4-grams, 4 distinct
    assert distinct_ngram_share([7, 7, 7]) == 1.0  # too short to repeat a 4-gram


def test_kl_per_position_by_hand():
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.4, 0.4, 0.2])
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    assert kl_per_position(p.log()[None], q.log()[None]).item() == pytest.approx(expected, rel=1e-5)
    assert kl_per_position(p.log()[None], p.log()[None] + 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_answer_kl_is_zero_against_itself_and_positive_against_another_model(tiny_model_path):
    policy, tokenizer = load_causal_lm(str(tiny_model_path))
    reference, _ = load_causal_lm(str(tiny_model_path))
    prompts = [[{"role": "user", "content": "Hi there"}], [{"role": "user", "content": "A much longer question?"}]]
    answers = [tokenizer("Hello friend")["input_ids"], tokenizer("Yes")["input_ids"]]
    assert answer_kl(policy, reference, tokenizer, prompts, answers) == pytest.approx([0.0, 0.0], abs=1e-5)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    moved = answer_kl(policy, reference, tokenizer, prompts, answers)
    assert all(kl > 0 for kl in moved)
    alone = answer_kl(policy, reference, tokenizer, prompts[1:], answers[1:])  # padding changes nothing
    assert alone[0] == pytest.approx(moved[1], rel=1e-4)


def test_answer_kl_in_length_sorted_batches_matches_each_answer_alone(tiny_model_path):
    policy, tokenizer = load_causal_lm(str(tiny_model_path))
    reference, _ = load_causal_lm(str(tiny_model_path))
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    questions = ["A rather long question about the weather tomorrow?", "Hi", "Two words", "Why is the sky blue?"]
    prompts = [[{"role": "user", "content": q}] for q in questions]
    answers = [tokenizer(a)["input_ids"] for a in ("Yes", "Hello there my friend", "Sunny and warm", "Light")]
    batched = answer_kl(policy, reference, tokenizer, prompts, answers, batch_size=3)  # two batches, reordered
    alone = [answer_kl(policy, reference, tokenizer, [p], [a])[0] for p, a in zip(prompts, answers)]
    assert batched == pytest.approx(alone, rel=1e-4)
    # by hand for the first answer: the logits at the prompt's last position and the answer's first ones
    text = tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answers[0]])
    with torch.no_grad():
        span = slice(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answers[0]))
        by_hand = kl_per_position(policy(input_ids=ids).logits[0, span], reference(input_ids=ids).logits[0, span])
    assert alone[0] == pytest.approx(by_hand.sum().item(), rel=1e-4)
    assert len(set(round(kl, 6) for kl in alone)) == len(alone)  # distinct, so a mixed-up order would show


def plain_reward_model(tiny_model_path, folder):
    """A reward model (a new head) on the tiny model, with no stage record (so no scale)."""
    AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1).save_pretrained(folder)
    reward_tokenizer(str(tiny_model_path)).save_pretrained(folder)
    return folder


def test_two_policies_identical_answers_get_one_score_a_tie(tmp_path, tiny_model_path):
    from evaluation.evaluate import reward_scores

    reward = plain_reward_model(tiny_model_path, tmp_path / "reward")
    messages = [[{"role": "user", "content": f"Question {i}?"}] for i in range(32)]
    baseline = [f"Answer {i}." + " ok" * (i % 5) for i in range(32)]
    # every other answer the same text; the others longer, so each policy's answers pad differently (scored apart,
    # 3 of the 16 identical answers differed by 1e-8)
    policy = [text if i % 2 else f"A much longer answer, number {i}, " * (1 + i % 4) for i, text in enumerate(baseline)]
    rewards = reward_scores(str(reward), messages, {"sft": baseline, "ppo": policy}, 8, torch.float32)
    same = [i for i in range(32) if i % 2]
    assert [rewards["ppo"][i] for i in same] == [rewards["sft"][i] for i in same]
    assert win_rate([rewards["ppo"][i] for i in same], [rewards["sft"][i] for i in same]) == 0.5


def test_a_reward_model_that_scores_nan_is_an_error_not_a_lost_comparison(tmp_path, tiny_model_path):
    from evaluation.evaluate import reward_scores
    from rlhf.errors import UserError
    from rlhf.reward_model import score_head

    folder = plain_reward_model(tiny_model_path, tmp_path / "reward")
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        score_head(model).weight.fill_(float("nan"))  # as a diverged reward model scores
    model.save_pretrained(folder)
    messages = [[{"role": "user", "content": f"Question {i}?"}] for i in range(3)]
    with pytest.raises(UserError, match=r"scored 3 of sft's answers nan \(the first: prompt 1\)"):
        reward_scores(str(folder), messages, {"sft": ["a", "b", "c"], "ppo": ["d", "e", "f"]}, 8, torch.float32)


def test_eval_report_of_a_tiny_run_matches_its_metrics(tmp_path, tiny_model_path, monkeypatch):
    runs = tmp_path / "runs"
    common = ["--config", "configs/tiny.yaml", f"--run.output_root={runs}", "--run.name=ev"]
    assert cli(["ppo", *common, f"--ppo.model={tiny_model_path}", "--ppo.total_episodes=16",
                "--ppo.reward_function=builtin:length", "--ppo.eval_every=1"]) == 0
    reward_dir = plain_reward_model(tiny_model_path, tmp_path / "reward")
    stale = tmp_path / "runs" / "ev" / ".eval.partial" / "final"  # an eval attempt killed before it published
    stale.mkdir(parents=True)
    (stale / "rounds.png").write_bytes(b"a plot of online rounds, which this run has not")
    prompts = tmp_path / "eight.jsonl"  # all of them (num_prompts 0): the report says 8, not "the first 8"
    prompts.write_text("".join((REPO / "data" / "eval_prompts.jsonl").read_text().splitlines(keepends=True)[:8]))
    moved = []  # the models put on the stage's device (config.hardware.device; a GPU where there is one)
    module_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda module, *args, **kwargs: (
        moved.append((type(module).__name__, str(args[0]) if args else None)), module_to(module, *args, **kwargs))[1])
    assert cli(["eval", *common, f"--eval.baseline={tiny_model_path}", f"--eval.reward_model={reward_dir}",
                f"--eval.policies=ppo,same={tiny_model_path}", f"--eval.prompts={prompts}",
                "--eval.num_prompts=0", "--eval.judge=tests.test_eval:words"]) == 0  # a user's judge, by its file
    monkeypatch.undo()
    assert [model for model, device in moved if device == "cpu"] == ["LlamaForCausalLM"] * 3 + [
        "LlamaForSequenceClassification"]

    run = runs / "ev"
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["prompts"] == 8 and set(results["policies"]) == {"sft", "ppo", "same"}
    same, ppo = results["policies"]["same"], results["policies"]["ppo"]
    # the baseline against itself: identical greedy answers, every prompt a tie, no KL
    assert same["kl"] == pytest.approx(0.0, abs=1e-5) and same["win_rate_reward"] == 0.5
    assert same["win_rate_judge"] == 0.5 and same["reward"] == pytest.approx(results["policies"]["sft"]["reward"])
    assert ppo["kl"] > 0 and ppo["win_rate_judge_low"] <= ppo["win_rate_judge"] <= ppo["win_rate_judge_high"]
    assert 0 < ppo["distinct_4grams"] <= 1 and same["distinct_4grams"] == results["policies"]["sft"]["distinct_4grams"]
    metrics = json.loads((run / "manifest.json").read_text())["stages"]["eval"]["metrics"]
    assert metrics["ppo/kl"] == ppo["kl"] and metrics["ppo/win_rate_reward"] == ppo["win_rate_reward"]

    report = (run / "report.md").read_text()
    assert f"8 held-out prompts from `{prompts}`; answers greedy" in report
    # an attempt that fails before its folder is published leaves the run's report as the published eval's
    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunDir, "publish", disk_full)
    assert cli(["eval", *common, f"--eval.baseline={tiny_model_path}", f"--eval.reward_model={reward_dir}",
                "--eval.policies=ppo", f"--eval.prompts={prompts}", "--eval.num_prompts=4",
                "--eval.judge=tests.test_eval:words"]) == 2
    monkeypatch.undo()
    assert (run / "report.md").read_text() == report
    # eval.baseline names the model PPO started from (its reference): still "SFT" in the report
    assert "policies against the SFT model" in report and "| win rate vs SFT (judge) |" in report
    assert "## PPO: judge (gold) and reward function (proxy) against KL" in report  # PPO maximised builtin:length
    row = next(line for line in report.splitlines() if line.startswith("| ppo |"))
    assert f"{ppo['reward']:.3f}" in row and f"{ppo['kl']:.3f}" in row and f"{ppo['distinct_4grams']:.3f}" in row
    assert "| distinct 4-grams |" in report
    assert (f"{ppo['win_rate_judge']:.3f} [{ppo['win_rate_judge_low']:.3f}, "
            f"{ppo['win_rate_judge_high']:.3f}]") in row
    for plot in ("training_curves.png", "reward_vs_kl.png", "score_distribution.png", "gold_vs_proxy.png"):
        assert f"](eval/{plot})" in report
        assert (run / "eval" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run / "eval" / "rounds.png").exists()  # the killed attempt's file was not published
    answers = [json.loads(line) for line in (run / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 8 and answers[0]["same_answer"] == answers[0]["sft_answer"]


def test_the_report_names_a_baseline_that_is_not_the_runs_sft_model_as_the_baseline(tmp_path):
    from evaluation.config import EvalStageConfig
    from evaluation.report import compared_against, report_text
    from rlhf.runs import RunDir

    run_dir = RunDir(tmp_path, "r")
    run_dir.record("ppo", inputs={"policy": str(tmp_path / "started_from")})
    assert compared_against(EvalStageConfig(), run_dir) == "SFT"
    assert compared_against(EvalStageConfig(baseline=str(tmp_path / "started_from")), run_dir) == "SFT"
    assert compared_against(EvalStageConfig(baseline=str(tmp_path / "r" / "sft")), run_dir) == "SFT"
    other = EvalStageConfig(baseline=str(tmp_path / "other"))
    assert compared_against(other, run_dir) == "baseline"
    results = {"sft": {"judge": 0.5, "kl": 0.0}, "ppo": {"judge": 0.7, "win_rate_judge": 0.6, "win_rate_judge_low": 0.5,
                                                         "win_rate_judge_high": 0.7, "kl": 1.0}}
    text = report_text(results, 8, run_dir, other, [])
    assert f"policies against the baseline `{tmp_path / 'other'}`" in text and "vs SFT" not in text
    assert "KL(policy || baseline)" in text and "KL to SFT" not in text
    assert "| win rate vs baseline (judge) |" in text and f"| baseline (`{tmp_path / 'other'}`) |" in text


def test_the_report_matches_a_bundled_baseline_by_its_folder(tmp_path):
    """eval.baseline given as a bundled model's name (configs/arithmetic.yaml) is PPO's reference found elsewhere."""
    from evaluation.config import EvalStageConfig
    from evaluation.report import compared_against
    from rlhf.runs import RunDir

    bundled = tmp_path / "models" / "smollm2-135m-instruct"
    run_dir = RunDir(tmp_path, "r")
    run_dir.record("ppo", inputs={"policy": str(bundled), "reward_model": str(tmp_path / "r" / "reward")},
                   config={"normalize_reward": True})
    named = EvalStageConfig(baseline="smollm2-135m-instruct")
    assert compared_against(named, run_dir, str(bundled)) == "SFT"
    assert compared_against(named, run_dir, str(tmp_path / "elsewhere")) == "baseline"


def test_missing_policies_and_models_name_the_command_that_makes_them(tmp_path, tiny_model_path, capsys):
    common = ["eval", "--config", "configs/tiny.yaml", f"--run.output_root={tmp_path / 'runs'}"]
    assert cli(common) == 2
    assert "rlhf sft" in capsys.readouterr().err
    assert cli(common + [f"--eval.baseline={tiny_model_path}"]) == 2
    assert "rlhf ppo" in capsys.readouterr().err
    assert cli(common + [f"--eval.baseline={tiny_model_path}", "--eval.policies=dpo"]) == 2
    assert "rlhf dpo" in capsys.readouterr().err
    assert cli(common + [f"--eval.baseline={tiny_model_path}", f"--eval.policies=x={tiny_model_path}"]) == 2
    assert "rlhf reward" in capsys.readouterr().err


def test_human_comparisons_are_queued_blind_and_their_votes_give_the_human_win_rate(tmp_path, tiny_model_path,
                                                                                       capsys):
    from preference_ui.stats import format_stats, stats
    from rlhf.store import Store

    policy, tokenizer = load_causal_lm(str(tiny_model_path))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    policy.save_pretrained(tmp_path / "moved")
    tokenizer.save_pretrained(tmp_path / "moved")
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    command = ["eval", "--config", "configs/tiny.yaml", f"--run.output_root={tmp_path / 'runs'}",
               f"--eval.baseline={tiny_model_path}", f"--eval.policies=moved={tmp_path / 'moved'}",
               "--eval.reward_model=none", "--eval.human=true", f"--eval.db={db}"]
    assert cli(command) == 0
    first_report = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    row = next(line for line in first_report.splitlines() if line.startswith("| moved |"))
    assert row.endswith("| - | 0 |")  # no votes yet: the people's columns say so
    store = Store(db)
    [batch] = {comparison["batch"] for comparison in store.comparisons()}  # eval-KEY: of these models and prompts
    assert batch.startswith("eval-") and f"`rlhf label serve --batch {batch}`" in capsys.readouterr().out
    queued = store.comparisons(batch)
    answers = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "eval" / "answers.jsonl").open()]
    assert len(queued) == sum(a["moved_answer"] != a["sft_answer"] for a in answers) >= 4
    assert all(c["kind"] == "eval" and {c["a_role"], c["b_role"]} == {"policy", "baseline"} for c in queued)
    assert {c["a_role"] for c in queued} == {"policy", "baseline"}  # the policy is not always on the same side

    labeller = store.add_user("ann", "labeller", "password-of-ann")
    for i, comparison in enumerate(queued):  # ann prefers the policy's answer, except one tie
        policy_side = "a" if comparison["a_role"] == "policy" else "b"
        store.cast_vote(comparison["id"], labeller, "tie" if i == 0 else policy_side)
    report = stats(store, batch)
    rate = report["human_win_rates"]["tiny/moved"]
    assert rate["votes"] == len(queued) and rate["win_rate"] == pytest.approx((len(queued) - 0.5) / len(queued))
    assert "human win rate of tiny/moved against the baseline" in format_stats(report)
    assert cli(command) == 0  # a second evaluation does not queue the same batch again, and reads the votes
    assert len(store.comparisons(batch)) == len(queued)
    row = next(line for line in (tmp_path / "runs" / "tiny" / "report.md").read_text().splitlines()
               if line.startswith("| moved |"))
    assert row.endswith(f"| {rate['win_rate']:.3f} [{rate['low']:.3f}, {rate['high']:.3f}] | {len(queued)} |")
    results = json.loads((tmp_path / "runs" / "tiny" / "eval" / "results.json").read_text())["policies"]
    assert results["moved"]["win_rate_human"] == rate["win_rate"]

    # the policy retrained (here: moved again): its answers go to a new batch, and the old votes are not its own
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    policy.save_pretrained(tmp_path / "moved")
    assert cli(command) == 0
    assert len({comparison["batch"] for comparison in store.comparisons()}) == 2
    results = json.loads((tmp_path / "runs" / "tiny" / "eval" / "results.json").read_text())["policies"]
    assert results["moved"]["human_votes"] == 0 and "win_rate_human" not in results["moved"]
    # the same models and prompts, answers cut shorter: other answers, so a batch of their own too
    assert cli([*command, "--eval.max_new_tokens=3"]) == 0
    assert len({comparison["batch"] for comparison in store.comparisons()}) == 3


def test_blind_comparisons_for_people_are_queued_all_or_none_under_prompts_the_store_does_not_clash_with(
        tmp_path, monkeypatch):
    from evaluation.config import EvalStageConfig
    from evaluation.evaluate import check_prompts_for_people, queue_human_comparisons
    from rlhf.config import RunConfig
    from rlhf.errors import DataError, UserError
    from rlhf.store import Store

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    config, run = EvalStageConfig(human=True, db=db, human_batch="eval"), RunConfig(name="r", output_root=str(tmp_path))
    prompts = [{"id": f"eval-{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}]} for i in range(4)]
    texts = {"sft": [f"old answer {i}" for i in range(4)], "ppo": [f"new answer {i}" for i in range(4)]}
    check_prompts_for_people(config, run, prompts)  # no store yet: nothing to clash with, and none made
    assert not (tmp_path / "labels.db").exists()
    store = Store(db)
    add_response, calls = store.add_response, []

    def killed_at_the_fifth(*args):
        calls.append(args)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return add_response(*args)

    monkeypatch.setattr(store, "add_response", killed_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        queue_human_comparisons(store, config, run, prompts, texts)
    assert store.comparisons("eval") == []  # the rerun does not find a batch cut short and leave it so
    monkeypatch.setattr(store, "add_response", add_response)
    assert queue_human_comparisons(store, config, run, prompts, texts) == 4
    assert len(store.comparisons("eval")) == 4
    # the same eval again queues nothing; a retrained policy's answers under the same batch name are refused (its
    # people's votes on the older answers were reported as the new policy's win rate)
    assert queue_human_comparisons(store, config, run, prompts, texts) == 0
    retrained = {**texts, "ppo": [f"newer answer {i}" for i in range(4)]}
    with pytest.raises(UserError, match="eval.human_batch 'eval' holds comparisons of other answers than these"):
        queue_human_comparisons(store, config, run, prompts, retrained)
    assert len(store.comparisons("eval")) == 4
    other = [{**prompts[0], "prompt": [{"role": "user", "content": "Another question?"}]}]
    with pytest.raises(DataError, match=r"id: 1 prompt id\(s\) are in the label store .* \(first: 'eval-0'\)"):
        check_prompts_for_people(config, run, other)


def test_every_policys_score_histogram_shares_one_set_of_bins():
    from evaluation.report import shared_bins

    edges = shared_bins([[0.0, 1.0], [0.5, 10.0]], count=4)
    assert edges == [0.0, 2.5, 5.0, 7.5, 10.0]
    assert shared_bins([[2.0], [2.0, 2.0]], count=2) == [1.5, 2.0, 2.5]  # all alike: one bar, centred


def test_an_earlier_rounds_eval_leaves_the_runs_report_and_each_round_asks_people_in_a_batch_of_its_own(tmp_path):
    """Run again after round 2 (the report's advice lacked --run.round), round 1's eval made the run's report
    round 1's; a named human batch was every round's, so round 2 reported round 1's votes as its own."""
    from evaluation.config import EvalStageConfig
    from evaluation.evaluate import human_batch, report_of_the_run
    from rlhf.config import RunConfig
    from rlhf.runs import RunDir

    for round in (1, 2):
        folder = RunDir(tmp_path, "r", round).stage_path("eval")
        folder.mkdir(parents=True)
        (folder / "report.md").write_text(f"round {round}: ![plot](plot.png)\n")
    report_of_the_run(RunDir(tmp_path, "r", 2))
    assert (tmp_path / "r" / "report.md").read_text() == "round 2: ![plot](round-2/eval/plot.png)\n"
    report_of_the_run(RunDir(tmp_path, "r", 1))
    assert (tmp_path / "r" / "report.md").read_text().startswith("round 2")
    named = EvalStageConfig(human=True, human_batch="people")
    assert human_batch(named, RunConfig(name="r", round=1, rounds=2), [], {}, {}) == "people"
    assert human_batch(named, RunConfig(name="r", round=2, rounds=2), [], {}, {}) == "people-round-2"
