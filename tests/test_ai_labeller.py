"""The AI labeller (preference_ui/ai_labeller.py) with the tiny model: the both-orders rule, its votes, and its
place in the labelling queue."""
import pytest

from preference_ui.ai_labeller import ai_label, ai_vote, comparison_messages, first_better, prefer_a
from rlhf import models
from rlhf.store import Store

PROMPT = "Name a colour of the sky."


def test_asking_both_orders_removes_position_bias_exactly(tiny_model_path):
    model, tokenizer = models.load_causal_lm(str(tiny_model_path))
    constitution = open("data/constitution.md").read()
    a, b = "Blue, on a clear day.", "Potatoes grow underground."
    a_first, b_first = first_better(model, tokenizer, [comparison_messages(constitution, PROMPT, a, b),
                                                       comparison_messages(constitution, PROMPT, b, a)])
    assert 0 < a_first < 1 and 0 < b_first < 1
    assert a_first != pytest.approx(1 - b_first, abs=1e-4)  # asked once, the order sways the answer
    forward, backward = (prefer_a(model, tokenizer, constitution, PROMPT, *pair) for pair in ((a, b), (b, a)))
    assert forward == pytest.approx((a_first + 1 - b_first) / 2) and forward + backward == pytest.approx(1.0)
    # one conversation alone scores as it does in a batch with another (left padding)
    [alone] = first_better(model, tokenizer, [comparison_messages(constitution, PROMPT, a, b)])
    assert alone == pytest.approx(a_first, abs=1e-5)


def test_the_vote_is_a_tie_near_one_half_and_clear_far_from_it():
    assert ai_vote(0.52, 0.05) == ("tie", None) and ai_vote(0.45, 0.05) == ("tie", None)
    assert ai_vote(0.58, 0.05) == ("a", "slight") and ai_vote(0.2, 0.05) == ("b", "clear")


def test_the_ai_labeller_votes_through_the_queue_under_its_own_account(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    for i in range(3):
        prompt = store.add_prompt(f"p{i}", "chat", [{"role": "user", "content": f"{PROMPT} {i}"}])
        store.add_comparison(store.add_response(prompt, f"Blue {i}.", "m", {}),
                             store.add_response(prompt, f"Grey {i}.", "m", {}), batch="b1")
    counts = ai_label(store, "tiny-llama", batch="b1", tie_margin=0.0)
    assert sum(counts.values()) == 3 and counts["tie"] == 0
    [labeller] = store.users()
    assert labeller.name == "ai/tiny-llama" and {vote.user_id for vote in store.votes()} == {labeller.id}
    assert sum(ai_label(store, "tiny-llama", batch="b1").values()) == 0  # nothing left for it


def test_ai_labellers_from_two_model_folders_of_one_name_are_two_labellers(tmp_path, tiny_model_path):
    """Two runs' `sft` folders vote as two accounts, named by folder and content: the second was refused every
    item as already voted (one account `ai/sft`), and its votes would have counted as the first's."""
    import shutil

    import torch

    from preference_ui.ai_labeller import ai_account
    from preference_ui.collect import inputs
    from preference_ui.config import PreferencesStageConfig
    from rlhf.config import RunConfig
    from rlhf.runs import hash_path

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    for i in range(3):
        prompt = store.add_prompt(f"p{i}", "chat", [{"role": "user", "content": f"{PROMPT} {i}"}])
        store.add_comparison(store.add_response(prompt, f"Blue {i}.", "m", {}),
                             store.add_response(prompt, f"Grey {i}.", "m", {}), batch="b1")
    first, second = tmp_path / "a" / "sft", tmp_path / "b" / "sft"
    for folder in (first, second):
        shutil.copytree(tiny_model_path, folder)
    retrained, _ = models.load_causal_lm(str(second))
    with torch.no_grad():
        retrained.get_output_embeddings().weight.mul_(1.5)
    retrained.save_pretrained(second)
    assert sum(ai_label(store, str(first), batch="b1", overlap=2).values()) == 3
    assert sum(ai_label(store, str(second), batch="b1", overlap=2).values()) == 3
    assert sum(ai_label(store, str(first), batch="b1", overlap=2).values()) == 0  # nothing left for it
    names = sorted(user.name for user in store.users())
    assert names == sorted(f"ai/sft-{hash_path(folder)[:8]}" for folder in (first, second)) and names[0] != names[1]
    assert ai_account("tiny-llama") == "ai/tiny-llama" and len(store.votes()) == 6
    # the preferences stage records the folder and the constitution as inputs (hashed by content)
    found = inputs(PreferencesStageConfig(model="tiny-llama", ai_judge=str(second)), RunConfig(output_root=tmp_path))
    assert found["ai_judge"] == str(second) and found["ai_constitution"] == "data/constitution.md"
    assert "ai_judge" not in inputs(PreferencesStageConfig(model="tiny-llama", ai_judge="tiny-llama"),
                                    RunConfig(output_root=tmp_path))


def test_the_ai_labeller_is_shown_the_whole_conversation_as_people_are(tmp_path, monkeypatch):
    import preference_ui.ai_labeller as ai_labeller

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    conversation = [{"role": "system", "content": "Reply only in French."},
                    {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Bleu."},
                    {"role": "user", "content": "Another one?"}]
    prompt = store.add_prompt("p", "chat", conversation)
    store.add_comparison(store.add_response(prompt, "Rouge.", "m", {}), store.add_response(prompt, "Red.", "m", {}),
                         batch="b1")
    asked = []
    monkeypatch.setattr(ai_labeller, "prefer_a", lambda model, tokenizer, constitution, question, a, b:
                        asked.append(question) or 0.9)
    ai_label(store, "tiny-llama", batch="b1")
    assert asked == ["[system]\nReply only in French.\n\n[user]\nName a colour.\n\n[assistant]\nBleu.\n\n"
                     "[user]\nAnother one?"]
    assert ai_labeller.question_of([{"role": "user", "content": PROMPT}]) == PROMPT


def test_label_ai_command_votes_and_refuses_a_missing_constitution_before_the_store_opens(tmp_path, capsys):
    from pipeline.cli import main as cli

    url = f"sqlite:///{tmp_path / 'labels.db'}"
    store = Store(url)
    prompt = store.add_prompt("p", "chat", [{"role": "user", "content": PROMPT}])
    store.add_comparison(store.add_response(prompt, "Blue.", "m", {}), store.add_response(prompt, "Grey.", "m", {}),
                         batch="b1")
    before = (tmp_path / "labels.db").read_bytes()
    assert cli(["label", "ai", "--db", url, "--model", "tiny-llama", "--constitution", str(tmp_path / "none.md")]) == 2
    assert "no constitution at" in capsys.readouterr().err and (tmp_path / "labels.db").read_bytes() == before
    assert cli(["label", "ai", "--db", url, "--model", "tiny-llama", "--tie-margin", "0.7"]) == 2
    assert "--tie-margin is a gap in probability" in capsys.readouterr().err
    assert cli(["label", "ai", "--db", url, "--model", "tiny-llama", "--overlap", "0"]) == 2  # it would vote gold only
    assert "--overlap must be at least 1" in capsys.readouterr().err
    assert cli(["label", "ai", "--db", url, "--model", "tiny-llama", "--gold-rate", "1.5"]) == 2
    assert (tmp_path / "labels.db").read_bytes() == before
    assert cli(["label", "ai", "--db", url, "--model", "tiny-llama", "--batch", "b1"]) == 0
    printed = dict(part.split("=") for part in capsys.readouterr().out.split())
    assert sorted(printed) == ["a", "b", "both_bad", "tie"] and sum(map(int, printed.values())) == 1
    assert len(store.votes()) == 1 and store.votes()[0].user_id == store.user("ai/tiny-llama").id
    store.set_disabled("ai/tiny-llama", True)  # an admin stopped it: it votes no more
    store.add_comparison(store.add_response(prompt, "Red.", "m", {}), store.add_response(prompt, "Tan.", "m", {}),
                         batch="b1")
    assert cli(["label", "ai", "--db", url, "--model", "tiny-llama", "--batch", "b1"]) == 2
    assert "labeller 'ai/tiny-llama' is disabled" in capsys.readouterr().err and len(store.votes()) == 1


def test_the_ai_labeller_benchmark_runs_on_the_tiny_model(tmp_path, capsys):
    import json

    from bench.ai_labeller import main

    assert main(["--model", "tiny-llama", "--answers-model", "tiny-llama", "--prompts", "4",
                 "--root", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0 <= results["gold_accuracy"] <= 1 and set(results["agreement"]) == {
        "builtin:length", "builtin:readability", "builtin:keywords", "builtin:sentiment"}
    lines = capsys.readouterr().out.splitlines()
    assert "on 12 gold items" in lines[-7] and lines[-1].startswith("ratio: ")


def test_the_preferences_stage_lets_an_ai_labeller_vote_first_beside_simulated_labellers(tmp_path, capsys):
    from pipeline.cli import main as cli

    common = ["--config", "configs/tiny.yaml", f"--run.output_root={tmp_path}", "--preferences.model=tiny-llama",
              "--preferences.num_prompts=6", "--preferences.overlap=2", "--preferences.simulate_labellers=2"]
    assert cli(["preferences", *common, "--preferences.ai_judge=tiny-llama",
                f"--preferences.ai_constitution={tmp_path / 'none.md'}"]) == 2
    assert "no constitution at" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
    assert cli(["preferences", *common, "--preferences.ai_judge=tiny-llama"]) == 0
    store = Store(f"sqlite:///{tmp_path / 'tiny' / 'labels.db'}", create=False)
    items = store.comparisons("tiny")
    by_user = {user.id: user.name for user in store.users()}
    voters = [sorted(by_user[vote.user_id].split("/")[0] for vote in store.votes() if vote.comparison_id == item["id"])
              for item in items]
    assert voters == [["ai", "sim"]] * len(items)  # the AI takes one of the two places, a simulated labeller the other


def test_the_ai_labeller_ranks_a_ranking_item_by_summed_preferences(tmp_path, tiny_model_path):
    from preference_ui.ai_labeller import ai_ranking, ai_vote

    model, tokenizer = models.load_causal_lm(str(tiny_model_path))
    constitution = open("data/constitution.md").read()
    answers = ["Blue.", "Grey at dusk.", "Potatoes."]
    ranks = ai_ranking(model, tokenizer, constitution, PROMPT, answers, tie_margin=0.0)
    wins = [0.0] * 3
    for i, j in ((0, 1), (0, 2), (1, 2)):
        preference = prefer_a(model, tokenizer, constitution, PROMPT, answers[i], answers[j])
        wins[i], wins[j] = wins[i] + preference, wins[j] + 1 - preference
    assert ranks == [1 + sum(other > wins[i] for other in wins) for i in range(3)]
    assert ai_ranking(model, tokenizer, constitution, PROMPT, answers, tie_margin=3.0) == [1, 1, 1]
    # two answers: the ranking ties where the pair vote does (each answer's mean against the other, 2 x the margin)
    lead = abs(prefer_a(model, tokenizer, constitution, PROMPT, answers[0], answers[1]) - 0.5)
    assert lead > 0 and ai_vote(0.5 + lead, 1.5 * lead)[0] == "tie"
    assert ai_ranking(model, tokenizer, constitution, PROMPT, answers[:2], tie_margin=1.5 * lead) == [1, 1]
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    prompt = store.add_prompt("r", "chat", [{"role": "user", "content": PROMPT}])
    store.add_ranking_item([store.add_response(prompt, text, "m", {}) for text in answers], batch="b1")
    assert ai_label(store, "tiny-llama", batch="b1")["ranked"] == 1 and len(store.rankings()) == 1
