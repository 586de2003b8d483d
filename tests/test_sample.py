import json
from itertools import combinations

import pytest

from preference_ui.config import PreferencesStageConfig
from preference_ui.sample import main
from rlhf.config import RunConfig, load_config
from rlhf.errors import MissingInputError, UserError
from rlhf.store import Comparison, Prompt, Response, Store
from tests.conftest import REPO


def config_for(tmp_path, *overrides):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "category": "chat", "prompt": f"Say something {i}."}) + "\n"
                               for i in range(3)))
    sections = load_config(REPO / "configs/tiny.yaml", [
        f"--run.output_root={tmp_path / 'runs'}", f"--preferences.prompts={prompts}", "--preferences.max_new_tokens=6",
        f"--preferences.db=sqlite:///{tmp_path / 'labels.db'}", "--preferences.batch_size=2",
        "--preferences.num_prompts=0", *overrides],
        {"run": RunConfig, "preferences": PreferencesStageConfig})
    return sections["preferences"], sections["run"]


def test_sampling_stores_every_pair_of_k_responses_as_comparisons(tmp_path, tiny_model_path):
    config, run = config_for(tmp_path, f"--preferences.model={tiny_model_path}", "--preferences.responses_per_prompt=3")
    summary = main(config, run)
    assert (summary["prompts"], summary["responses"], summary["comparisons"], summary["batch"]) == (3, 9, 9, "tiny")
    store = Store(config.db)
    comparisons = store.comparisons("tiny")
    assert len(comparisons) == 9 and {c["prompt"][0]["content"] for c in comparisons} == \
        {f"Say something {i}." for i in range(3)}
    with store.session() as session:
        responses = session.query(Response).all()
        pairs = {(c.response_a_id, c.response_b_id) for c in session.query(Comparison)}
    assert len(responses) == 9 and responses[0].model == str(tiny_model_path)
    assert responses[0].sampling == {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "max_new_tokens": 6, "seed": 0}
    by_prompt = {}
    for response in responses:
        by_prompt.setdefault(response.prompt_id, []).append(response.id)
    expected = {frozenset(pair) for ids in by_prompt.values() for pair in combinations(ids, 2)}
    assert {frozenset(pair) for pair in pairs} == expected
    assert any(a > b for a, b in pairs) and any(a < b for a, b in pairs)  # a/b order is shuffled
    with pytest.raises(UserError, match="batch 'tiny' already has comparisons"):
        main(config, run)


def test_the_same_answer_sampled_twice_is_not_compared_with_itself(tmp_path, tiny_model_path):
    # near-greedy sampling: each prompt's 3 answers come out the same text
    config, run = config_for(tmp_path, f"--preferences.model={tiny_model_path}", "--preferences.responses_per_prompt=3",
                             "--preferences.temperature=0.001")
    summary = main(config, run)
    with Store(config.db).session() as session:
        texts = [r.text for r in session.query(Response).order_by(Response.id)]
    assert summary["responses"] == 9 and all(len(set(texts[i:i + 3])) == 1 for i in range(0, 9, 3))
    assert summary["comparisons"] == 0 and not Store(config.db).comparisons("tiny")


def test_ranking_feedback_makes_one_ranking_item_of_each_prompts_different_answers(tmp_path, tiny_model_path):
    config, run = config_for(tmp_path, f"--preferences.model={tiny_model_path}", "--preferences.responses_per_prompt=4",
                             "--preferences.feedback=ranking")
    summary = main(config, run)
    assert (summary["comparisons"], summary["feedback"]) == (3, "ranking")
    store = Store(config.db)
    items = store.comparisons("tiny")
    assert all(len(set(item["answers"])) == len(item["answers"]) for item in items)
    assert sum(len(item["answers"]) for item in items) >= 9  # four samples a prompt, a repeated text only once
    with store.session() as session:
        by_id = {response.id: response for response in session.query(Response)}
    orders = [[by_id[i].id for i in store.ranking_answers(item["id"])] for item in items]
    assert any(order != sorted(order) for order in orders)  # shown in a random order, not the sampling order
    assert {by_id[order[0]].prompt_id for order in orders} == {1, 2, 3}
    for bad, message in ((["--preferences.responses_per_prompt=7"], "at most 6 answers"),
                         (["--preferences.select=uncertain"], "select: all"),
                         (["--preferences.feedback=ranked"], "feedback must be pairwise or ranking")):
        with pytest.raises(Exception, match=message):
            config_for(tmp_path, "--preferences.feedback=ranking", *bad)


def test_sampling_without_a_model_names_the_command_that_makes_one(tmp_path):
    config, run = config_for(tmp_path)
    with pytest.raises(MissingInputError, match=r"run `rlhf sft --config \.\.\. --run.name tiny` first"):
        main(config, run)
    with pytest.raises(Exception, match="responses_per_prompt must be at least 2"):
        config_for(tmp_path, "--preferences.responses_per_prompt=1")


def test_sample_command_help_and_errors(tmp_path, capsys):
    from pipeline.cli import main as cli

    with pytest.raises(SystemExit):
        cli(["label", "sample", "--help"])
    assert "--preferences.responses_per_prompt (default: 2)" in capsys.readouterr().out
    assert cli(["label", "sample", "--config", "configs/tiny.yaml", f"--run.output_root={tmp_path}"]) == 2
    assert "no SFT model at" in capsys.readouterr().err


def test_select_uncertain_queues_the_pairs_the_reward_ensemble_disagrees_on(tmp_path, tiny_model_path):
    from transformers import AutoModelForSequenceClassification

    from pipeline.cli import main as cli
    from preference_ui.sample import pair_uncertainty
    from rlhf.reward_model import load_reward_model, reward_tokenizer, score_heads
    from rlhf.runs import atomic_write_json

    reward_dir = tmp_path / "reward"  # an untrained 3-head ensemble: its heads disagree at random
    tokenizer = reward_tokenizer(str(tiny_model_path))
    AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=3).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    atomic_write_json(reward_dir / "stage.json", {"stage": "reward", "reward": {"heads": 3}})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Say something {i}."}) + "\n" for i in range(4)))
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    assert cli(["label", "--db", db, "sample", "--config", "configs/tiny.yaml", "--select", "uncertain",
                "--reward-model", str(reward_dir), "--select-count", "5", f"--preferences.model={tiny_model_path}",
                f"--preferences.prompts={prompts}", "--preferences.responses_per_prompt=3",
                "--preferences.max_new_tokens=6", "--preferences.num_prompts=0",
                f"--run.output_root={tmp_path / 'runs'}"]) == 0
    store = Store(db)
    queued = {(c["a"], c["b"]) for c in store.comparisons("tiny")}
    assert len(queued) == 5
    with store.session() as session:  # every candidate pair, scored by hand with the same model
        responses = session.query(Response).all()
        prompt_messages = {p.id: p.messages for p in session.query(Prompt)}
    model = load_reward_model(str(reward_dir), tokenizer)
    by_prompt = {}
    for response in responses:
        by_prompt.setdefault(response.prompt_id, []).append(response)
    spreads = {}
    for group in by_prompt.values():
        messages = prompt_messages[group[0].prompt_id]
        rewards = score_heads(model, tokenizer, [messages + [{"role": "assistant", "content": r.text}] for r in group])
        for (i, a), (j, b) in combinations(enumerate(group), 2):
            spreads[frozenset((a.text, b.text))] = pair_uncertainty(rewards[i] - rewards[j])
    assert len(spreads) == 12
    threshold = sorted(spreads.values(), reverse=True)[4]
    assert all(spreads[frozenset(pair)] >= threshold for pair in queued)
    assert min(spreads[frozenset(p)] for p in queued) > sorted(spreads.values())[0]


def test_batched_answers_come_back_in_prompt_order_as_one_at_a_time(tiny_model_path):
    """Prompts are batched longest first; the answers are put back in the prompts' order and match answering each
    prompt alone (greedy, so padding must not change them)."""
    import torch

    from rlhf import models
    from rlhf.generation import answer_prompts

    model, tokenizer = models.load_causal_lm(str(tiny_model_path))
    torch.manual_seed(0)
    with torch.no_grad():  # the tiny model repeats one token whatever it is asked: noise makes answers differ
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    prompts = [[{"role": "user", "content": text}] for text in
               ("Hi.", "Tell me a long story about a lighthouse keeper and her cat, please.", "Why is the sky blue?",
                "Name three rivers in Europe that flow into the sea.", "Ok?")]
    batched = [answer.ids for answer in answer_prompts(model, tokenizer, prompts, 8, batch_size=2)]
    alone = [answer_prompts(model, tokenizer, [prompt], 8, batch_size=1)[0].ids for prompt in prompts]
    assert batched == alone and len({tuple(ids) for ids in alone}) == len(prompts)


@pytest.mark.parametrize("precision, dtype", [("bf16", "bfloat16"), ("fp32", "float32")])
def test_sampling_generates_in_the_configured_precision(tmp_path, tiny_model_path, caplog, monkeypatch, precision,
                                                        dtype):
    from types import SimpleNamespace

    from rlhf import models

    loaded = []

    def load_and_record(spec, weights_dtype=None):
        model, tokenizer = models.load_causal_lm(spec, weights_dtype)
        loaded.append(str(model.dtype).removeprefix("torch."))
        return model, tokenizer

    monkeypatch.setattr("preference_ui.sample.models", SimpleNamespace(load_causal_lm=load_and_record))
    config, run = config_for(tmp_path, f"--preferences.model={tiny_model_path}", f"--preferences.precision={precision}")
    with caplog.at_level("INFO"):
        assert main(config, run)["responses"] == 6
    assert loaded == [dtype]
    assert f"[label sample] device=cpu dtype={dtype} (precision={precision} set in config)" in caplog.text


def test_prompts_whose_ids_the_store_holds_with_other_text_are_refused_before_sampling(tmp_path, tiny_model_path):
    from rlhf.errors import DataError
    from rlhf.store import StoreError

    config, run = config_for(tmp_path, f"--preferences.model={tiny_model_path}")
    store = Store(config.db)
    stored = store.add_prompt("q1", "chat", [{"role": "user", "content": "Another question."}])
    assert store.add_prompt("q1", "chat", [{"role": "user", "content": "Another question."}]).id == stored.id
    with pytest.raises(StoreError, match="prompt id 'q1' is in the label store with other text"):
        store.add_prompt("q1", "chat", [{"role": "user", "content": "Say something 1."}])
    with pytest.raises(DataError, match=rf"{tmp_path / 'prompts.jsonl'}: id: 1 prompt id\(s\) are in the label "
                                        r"store .* with other text \(first: 'q1'\)"):
        main(config, run)  # the answers would have been shown and exported under "Another question."
    with store.session() as session:
        assert session.query(Response).count() == 0 and session.query(Prompt).count() == 1


def test_a_rerun_reuses_its_batch_only_when_drawn_from_the_same_model_prompts_and_settings(tmp_path, capsys):
    """Round 1's batch is named after the run: a rerun after a change must not publish the old answers as new."""
    from pipeline.cli import main as cli
    from rlhf.runs import hash_path

    common = ["preferences", "--config", "configs/tiny.yaml", f"--run.output_root={tmp_path}",
              "--preferences.model=tiny-llama", "--preferences.num_prompts=6"]
    assert cli(common) == 0
    published = tmp_path / "tiny" / "preferences"
    before = hash_path(published)
    assert cli([*common, "--preferences.temperature=0.3"]) == 2
    assert "batch 'tiny' in sqlite:///" in capsys.readouterr().err
    assert hash_path(published) == before
    assert cli(common) == 0  # the same draw: the batch and its votes are reused
    assert "batch 'tiny' already sampled: 6 comparisons" in capsys.readouterr().out
    assert cli([*common, "--preferences.temperature=0.3", "--preferences.batch=cooler"]) == 0
    # other simulated labellers (judge, noise) would find every place taken by the old ones: refused, not the old
    # votes exported as theirs
    before = hash_path(published)
    for changed in ("--preferences.simulate_judge=builtin:keywords", "--preferences.simulate_noise=0.2"):
        assert cli([*common, changed]) == 2
        assert "was voted on by simulated or AI labellers with other settings" in capsys.readouterr().err
        assert hash_path(published) == before
    # a batch sampled for people with `rlhf label sample` carries the same key: a run on other settings is refused
    # (its export would hold 8 prompts' pairs while the run counts 6 taken), on the same ones it is reused
    people = [f"--run.output_root={tmp_path}", "--run.name=people", "--preferences.model=tiny-llama"]
    assert cli(["label", "sample", "--config", "configs/tiny.yaml", *people, "--preferences.num_prompts=8"]) == 0
    assert cli(["preferences", "--config", "configs/tiny.yaml", *people, "--preferences.num_prompts=6"]) == 2
    assert "batch 'people' in sqlite:///" in capsys.readouterr().err
    assert cli(["preferences", "--config", "configs/tiny.yaml", *people, "--preferences.num_prompts=8"]) == 0
    assert "batch 'people' already sampled: 8 comparisons" in capsys.readouterr().out
    # in a later round, the advice is for that round alone (--preferences.batch is every round's: round 1 would
    # sample, label and train again)
    from preference_ui.collect import check_same_draw
    from rlhf.errors import UserError
    from rlhf.store import Store

    store = Store(f"sqlite:///{tmp_path / 'tiny' / 'labels.db'}")  # the same draw, voted by other labellers
    with pytest.raises(UserError, match=r"voted on by simulated or AI labellers with other settings.*label a new batch "
                                        r"for round 2 alone: in the config file .* a `round-2:` section with "
                                        r"preferences: \{batch: NAME\}"):
        check_same_draw(store, "tiny", {"drawn_from": store.batch_sampling("tiny")["drawn_from"], "labelled_by": "x"},
                        None, 2)


def test_a_gold_file_other_than_the_one_the_stores_gold_items_came_from_is_refused_before_any_sampling(tmp_path,
                                                                                                        capsys):
    """The gold items are the store's, shared by its runs: another file's were found only after the stage had
    sampled and stored a new batch, with advice (another --batch) the stage has no setting for."""
    from pipeline.cli import main as cli

    common = ["preferences", "--config", "configs/tiny.yaml", f"--run.output_root={tmp_path}",
              "--preferences.model=tiny-llama", "--preferences.num_prompts=4"]
    assert cli([*common, "--preferences.gold=data/gold_comparisons.jsonl"]) == 0
    store = Store(f"sqlite:///{tmp_path / 'tiny' / 'labels.db'}")
    batches, comparisons = store.batches(), len(store.comparisons())
    other = tmp_path / "other_gold.jsonl"
    other.write_text('{"prompt": "2+2?", "a": "4", "b": "5", "expected": "a"}\n')
    assert cli([*common, f"--preferences.gold={other}", "--preferences.batch=second"]) == 2
    error = capsys.readouterr().err
    assert f"batch 'gold' of sqlite:///{tmp_path / 'tiny' / 'labels.db'} already holds different comparisons than " \
           f"{other}: the gold items are the store's own" in error and "preferences.db" in error
    assert (store.batches(), len(store.comparisons())) == (batches, comparisons)  # nothing sampled


def test_batch_keys_keep_older_batches_keys_and_follow_the_judges_code():
    """Round 1's key counts feedback and selection only where set otherwise than by default, so a batch keyed
    before they counted keeps its key (a rerun would refuse it as drawn otherwise); the machine labellers' key
    follows a `module:function` judge's code (the stage's input `simulate_judge`)."""
    import dataclasses

    from preference_ui.collect import ROUND_1_SAMPLING_SETTINGS, batch_keys
    from rlhf.runs import hash_config

    config, run = PreferencesStageConfig(simulate_judge="my.judges:tone"), RunConfig(name="keys")
    hashes = {"model": "model-hash", "prompts": "prompts-hash", "simulate_judge": "code-1"}
    before = hash_config({"inputs": {"model": "model-hash", "prompts": "prompts-hash"},
                          **{name: getattr(config, name) for name in ROUND_1_SAMPLING_SETTINGS}})[:8]
    keys = batch_keys(config, run, hashes)
    assert keys["drawn_from"] == before
    assert batch_keys(dataclasses.replace(config, select="uncertain"), run, hashes)["drawn_from"] != before
    assert batch_keys(config, run, {**hashes, "simulate_judge": "code-2"})["labelled_by"] != keys["labelled_by"]
    assert batch_keys(config, run, {**hashes, "simulate_judge": "code-2"})["drawn_from"] == before
    assert "labelled_by" not in batch_keys(dataclasses.replace(config, simulate_judge=""), run, hashes)
    # the AI labeller's constitution and model folder count by content (the stage records both as inputs)
    ai = dataclasses.replace(config, ai_judge="runs/other/sft")
    ai_keys = {text: batch_keys(ai, run, {**hashes, "ai_constitution": text[0], "ai_judge": text[1]})["labelled_by"]
               for text in (("c-1", "w-1"), ("c-2", "w-1"), ("c-1", "w-2"))}
    assert len(set(ai_keys.values())) == 3 and keys["labelled_by"] not in ai_keys.values()
    # a batch keyed before the constitution counted keeps its votes for an AI labeller of a bundled model (its
    # account is named as before); of a model folder, whose account is named by content now, it does not
    from preference_ui.collect import older_labelled_by

    bundled = dataclasses.replace(config, ai_judge="tiny-llama")
    assert older_labelled_by(bundled, run, {**hashes, "ai_constitution": "c-1"}) == batch_keys(bundled, run,
                                                                                               hashes)["labelled_by"]
    assert older_labelled_by(dataclasses.replace(config, ai_judge="."), run, hashes) is None  # a folder
    assert older_labelled_by(config, run, hashes) is None  # no AI labeller
