"""Bad input to the commands that read files: one line naming the file, the row and the field, exit 2, and the
output root as it was (nothing locked, recorded, created or opened). The corpus, tests/bad_inputs/, is ours: each
file holds one malformed kind, and expected.json says what the error names (line: field: problem)."""
import contextlib
import gc
import hashlib
import json
import shutil
import sqlite3

import pytest

from pipeline.cli import main as cli
from rlhf.models import load_tokenizer
from tests.conftest import REPO

CORPUS = REPO / "tests" / "bad_inputs"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())


NOT_A_JUDGE = 3.14


def one_score_short(prompts, answers):
    return [1.0] * (len(answers) - 1)


def not_a_number(prompts, answers):
    return [float("nan")] * len(answers)


def corpus(*kinds: str) -> list[str]:
    """The corpus files of these row kinds, and the malformed files of any kind (bad JSON, empty, ...)."""
    return sorted(name for name in EXPECTED if name.split("_")[0] in (*kinds, "any"))


def commands(model: str, root, reward: str = "") -> list[tuple[list[str], list[str]]]:
    """(the command with FILE where the bad file goes, the corpus files it is given): every command that reads
    a file, each of its file options."""
    common = ["--config", "configs/tiny.yaml", f"--run.output_root={root}", "--run.tracking=none"]
    ppo = ["ppo", *common, f"--ppo.model={model}", "--ppo.reward_function=builtin:length"]
    return [
        (["sft", *common, f"--sft.model={model}", "--sft.train_data=FILE"], corpus("sft")),
        (["sft", *common, f"--sft.model={model}", "--sft.sample_prompts=FILE"], corpus("prompts")),
        (["preferences", *common, f"--preferences.model={model}", "--preferences.prompts=FILE"], corpus("prompts")),
        (["preferences", *common, f"--preferences.model={model}", "--preferences.gold=FILE"], corpus("gold")),
        (["reward", *common, f"--reward.model={model}", "--reward.preferences=FILE"], corpus("pairs")),
        ([*ppo, "--ppo.prompts=FILE"], corpus("prompts")),
        ([*ppo, "--ppo.eval_prompts=FILE"], corpus("prompts")),
        (["dpo", *common, f"--dpo.model={model}", "--dpo.preferences=FILE"], corpus("pairs")),
        (["dpo", *common, f"--dpo.model={model}", "--dpo.pairs=on_policy", f"--dpo.reward_model={reward}",
          "--dpo.prompts=FILE"], corpus("prompts")),
        (["eval", *common, f"--eval.baseline={model}", f"--eval.policies=other={model}", "--eval.reward_model=none",
          "--eval.prompts=FILE"], corpus("prompts")),
        (["label", "sample", *common, f"--preferences.model={model}", "--preferences.prompts=FILE"],
         corpus("prompts")),
        (["label", "gold", "FILE", "--db", f"sqlite:///{root / 'labels.db'}"], corpus("gold")),
    ]


def test_the_bad_input_corpus_through_every_command_that_reads_a_file(tmp_path, tiny_model_path, tiny_reward_path,
                                                                    capsys):
    root = tmp_path / "runs"
    run = root / "tiny"  # an earlier run of the same name, which a failed attempt must leave as it is
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"run": "tiny", "stages": {"sft": {"status": "done"}}}))
    (run / "notes.txt").write_text("earlier work")
    before = tree_digest(root)
    for command, files in commands(str(tiny_model_path), root, str(tiny_reward_path)):
        for name in files:
            path = CORPUS / name
            words = [word.replace("FILE", str(path)) for word in command]
            assert cli(words) == 2, words
            error = capsys.readouterr().err
            where = f"{path}:" if EXPECTED[name][0].isdigit() else f"{path}: "
            assert error.startswith(f"error: {where}{EXPECTED[name]}"), (words, error)
            assert len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
            assert tree_digest(root) == before, words
    assert {name for _, files in commands("", root) for name in files} == set(EXPECTED)  # every file is used


def tree_digest(root) -> dict:
    """Every path under `root` with its contents' hash (folders with None)."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


@pytest.fixture
def bad_files(tmp_path):
    files = {"prompts": '{"id": "a", "prompt": "Tell me about rain."}\n{"id": "b"}\n',
             "pairs": '{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hey."}\n'
                      '{"prompt": "Hi?", "chosen": "Yo.", "rejected": "Yo."}\n',
             "gold": '{"id": "g1", "prompt": "Hi?", "a": "Hello.", "b": "Hey.", "expected": "a"}\n'
                     '{"id": "g2", "prompt": "Hi?", "a": "Hello.", "b": "Hey.", "expected": "maybe"}\n'}
    for name, text in files.items():
        (tmp_path / f"bad_{name}.jsonl").write_text(text)
    return {name: tmp_path / f"bad_{name}.jsonl" for name in files}


def test_bad_files_stop_dpo_eval_and_labelling_with_exit_2_before_anything_is_written(tmp_path, tiny_model_path,
                                                                                         tiny_reward_path, bad_files,
                                                                                         capsys):
    root = tmp_path / "runs"
    run = root / "tiny"  # an earlier run of the same name, which a failed attempt must leave as it is
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"run": "tiny", "stages": {}}))
    (run / "notes.txt").write_text("earlier work")
    before = tree_digest(root)
    common = ["--config", "configs/tiny.yaml", f"--run.output_root={root}", "--run.tracking=none"]
    model = str(tiny_model_path)
    wide = tmp_path / "wide.jsonl"  # wider than the label store's columns (PostgreSQL would refuse it mid-stage)
    wide.write_text(json.dumps({"id": "p" * 200, "prompt": "Hi?"}) + "\n")
    other_vocabulary = tmp_path / "other-vocabulary"  # the tiny model with one token more
    shutil.copytree(model, other_vocabulary)
    tokenizer = load_tokenizer(str(other_vocabulary))
    tokenizer.add_tokens(["<a-new-token>"])
    tokenizer.save_pretrained(other_vocabulary)
    other_reward = tmp_path / "other-reward"  # a reward model on that vocabulary
    shutil.copytree(tiny_reward_path, other_reward)
    tokenizer.save_pretrained(other_reward)
    wide_category = tmp_path / "wide_category.jsonl"
    wide_category.write_text(json.dumps({"id": "p1", "prompt": "Hi?", "category": "c" * 65}) + "\n")
    cases = [
        (["preferences", f"--preferences.model={model}", f"--preferences.prompts={wide}",
          "--preferences.num_prompts=0"],
         f"{wide}: id: '{'p' * 40}...' is 200 characters, more than the label store holds (128)"),
        (["label", "sample", f"--preferences.model={model}", f"--preferences.prompts={wide_category}",
          "--preferences.num_prompts=0"],
         f"{wide_category}: category: '{'c' * 40}...' is 65 characters"),
        (["dpo", f"--dpo.model={model}", f"--dpo.preferences={bad_files['pairs']}"],
         f"{bad_files['pairs']}:2: rejected: is the same answer as 'chosen'"),
        (["eval", f"--eval.baseline={model}", f"--eval.policies=other={model}", "--eval.reward_model=none",
          f"--eval.prompts={bad_files['prompts']}"], f"{bad_files['prompts']}:2: prompt: missing"),
        (["eval", f"--eval.baseline={model}", f"--eval.policies=other={model}", "--eval.reward_model=none",
          "--eval.judge=builtin:nonesuch"], "eval.judge: judge 'builtin:nonesuch': no such built-in"),
        # the setting named: several settings take a judge, and the same words came from each
        (["ppo", f"--ppo.model={model}", "--ppo.reward_function=nosuchmodule:score"],
         "ppo.reward_function: judge 'nosuchmodule:score': cannot load"),
        (["preferences", f"--preferences.model={model}", "--preferences.simulate_judge=nosuchmodule:score"],
         "preferences.simulate_judge: judge 'nosuchmodule:score': cannot load"),
        (["eval", f"--eval.baseline={model}", f"--eval.policies=other={other_vocabulary}", "--eval.reward_model=none"],
         f"eval.policies: 'other' ({other_vocabulary}) has another tokenizer than the baseline ({model})"),
        # people's comparisons for a store URL that is none: refused before any answer (was after every answer)
        (["eval", f"--eval.baseline={model}", f"--eval.policies=other={model}", "--eval.reward_model=none",
          "--eval.human=true", "--eval.db=postgres//typo"], "label store 'postgres//typo': not a database URL"),
        # a language model given as the reward model would score with a new, random head
        (["eval", f"--eval.baseline={model}", f"--eval.policies=other={model}", f"--eval.reward_model={model}"],
         f"{model}: not a reward model (its config.json names LlamaForCausalLM architecture"),
        (["ppo", f"--ppo.model={model}", f"--ppo.reward_model={model}"], f"{model}: not a reward model"),
        # and a reward model given as a policy would answer through a new, random head
        (["eval", f"--eval.baseline={model}", f"--eval.policies=rm={tiny_reward_path}", "--eval.reward_model=none"],
         f"eval.policies: 'rm': {tiny_reward_path} is a reward model (LlamaForSequenceClassification)"),
        (["dpo", f"--dpo.model={tiny_reward_path}"], f"dpo.model: {tiny_reward_path} is a reward model"),
        (["sft", f"--sft.model={tiny_reward_path}"], f"sft.model: {tiny_reward_path} is a reward model"),
        (["preferences", f"--preferences.model={tiny_reward_path}"], f"preferences.model: {tiny_reward_path} is a"),
        (["ppo", f"--ppo.model={model}", f"--ppo.reward_model={other_reward}"],
         f"{other_reward}: its tokenizer is not the policy's ({model}), and PPO's critic"),
        # a judge that is no function, or that returns too few scores or NaN, stops before any answer is generated
        (["eval", f"--eval.baseline={model}", f"--eval.policies=other={model}", "--eval.reward_model=none",
          "--eval.judge=tests.test_bad_input:NOT_A_JUDGE"], "judge 'tests.test_bad_input:NOT_A_JUDGE': a float"),
        (["eval", f"--eval.baseline={model}", f"--eval.policies=other={model}", "--eval.reward_model=none",
          "--eval.judge=tests.test_bad_input:one_score_short"],
         "judge tests.test_bad_input:one_score_short returned 0 scores for 1 answers"),
        (["ppo", f"--ppo.model={model}", "--ppo.reward_function=tests.test_bad_input:not_a_number"],
         "judge tests.test_bad_input:not_a_number scored answer 1 of 1 nan: scores must be finite numbers"),
        (["preferences", f"--preferences.model={model}",
          "--preferences.simulate_judge=tests.test_bad_input:not_a_number"],
         "judge tests.test_bad_input:not_a_number scored answer 1 of 1 nan"),
        # a later online round learns from its own round's reward model
        (["ppo", f"--ppo.model={model}", f"--ppo.reward_model={model}", "--run.round=2"],
         "ppo.reward_model is set, but online round 2 trains against its own reward model"),
        (["dpo", f"--dpo.model={model}", "--dpo.pairs=on_policy", f"--dpo.reward_model={model}", "--run.round=3"],
         "dpo.reward_model is set, but online round 3 trains against its own reward model"),
        # a policy named as another input would stand in for it
        (["eval", f"--eval.baseline={model}", f"--eval.policies=sft={model}", "--eval.reward_model=none"],
         "eval.policies: 'sft' names another input (sft, reward_model, prompts, judge)"),
        (["eval", f"--eval.baseline={model}", f"--eval.policies=a={model},a={model}", "--eval.reward_model=none"],
         "eval.policies: 'a' is named twice"),
        # a mistyped store URL as the preference source: an error, and no new empty store
        (["reward", f"--reward.model={model}", f"--reward.preferences=sqlite:///{root / 'nosuch.db'}"],
         f"no label store at {root / 'nosuch.db'}"),
        (["dpo", f"--dpo.model={model}", f"--dpo.preferences=sqlite:///{root / 'nosuch.db'}"],
         f"no label store at {root / 'nosuch.db'}"),
        (["preferences", f"--preferences.model={model}", f"--preferences.prompts={bad_files['prompts']}"],
         f"{bad_files['prompts']}:2: prompt: missing"),
        (["preferences", f"--preferences.model={model}", f"--preferences.gold={bad_files['gold']}"],
         f"{bad_files['gold']}:2: expected: expected one of"),
        (["preferences", f"--preferences.model={model}", "--preferences.simulate_judge=nosuch:judge"], "nosuch:judge"),
        (["preferences", f"--preferences.model={model}", "--preferences.simulate_judge=", "--preferences.min_votes=4"],
         "preferences: min_votes (4) is more than overlap (3)"),  # people voting: the wait would never end
        (["preferences", f"--preferences.model={model}", "--preferences.simulate_labellers=2",
          "--preferences.min_votes=3"], "min_votes (3) is more than the 2 vote(s) each comparison gets"),
        # a later online round learns from its own pairs: a fixed preference source would be every round's
        (["reward", f"--reward.model={model}", "--run.round=2", "--reward.preferences=data/gold_comparisons.jsonl"],
         "reward.preferences is set, but online round 2 trains on every round's own votes"),
        (["dpo", f"--dpo.model={model}", "--run.round=2", "--dpo.preferences=data/gold_comparisons.jsonl"],
         "dpo.preferences is set, but online round 2 trains on the round's own pairs (round-2/preferences)"),
        (["reward", f"--reward.model={model}", "--reward.pad_token=<|im_end|>"],
         "reward: pad_token ('<|im_end|>'): the stage picks the pad token itself"),
        (["preferences", f"--preferences.model={model}", "--preferences.batch_size=0"],
         "batch_size and max_new_tokens must be at least 1, got 0 and"),  # was a traceback after loading the model
        (["preferences", f"--preferences.model={model}", "--preferences.db=postgres//typo"],
         "label store 'postgres//typo': not a database URL"),  # was a traceback, and a manifest entry and locks
        (["preferences", f"--preferences.model={model}", "--preferences.select_count=-5"],
         "num_prompts, select_count, round_prompts and round_budget must be 0 or more"),  # kept all but 5
        # batch names the store's column cannot hold, with room for a later round's suffix (128 - 18)
        (["label", "sample", f"--preferences.model={model}", f"--preferences.batch={'b' * 129}"],
         f"batch name '{'b' * 40}...' (preferences.batch, else run.name) is 129 characters; the label store holds 128"),
        (["preferences", f"--preferences.model={model}", f"--preferences.batch={'b' * 111}", "--run.rounds=2"],
         "is 111 characters; the label store holds 110 in a run of several rounds"),
        # the whole chain: a later stage's bad file or judge stops it before the first stage writes anything
        (["run", f"--eval.prompts={bad_files['prompts']}"], f"{bad_files['prompts']}:2: prompt: missing"),
        (["run", "--ppo.judge=builtin:nonesuch"], "ppo.judge: judge 'builtin:nonesuch'"),
        # a prompt file that a later round would find used up: told before round 1 trains
        (["run", "--run.rounds=3", "--preferences.num_prompts=80"], "round 3 takes prompts 161-240"),
        # more prompts asked than the file holds (the stage went on with fewer, unsaid)
        (["run", "--preferences.num_prompts=300"],
         "data/rl_prompts.jsonl: rows: preferences.num_prompts is 300, but the file holds 200 distinct rows"),
        (["run", "--ppo.num_eval_prompts=400"], "ppo.num_eval_prompts is 400, but the file holds 320 distinct rows"),
        (["eval", f"--eval.baseline={model}", f"--eval.policies=other={model}", "--eval.reward_model=none",
          "--eval.num_prompts=321"], "data/eval_prompts.jsonl: rows: eval.num_prompts is 321, but the file holds 320"),
        (["run", f"--preferences.gold={bad_files['gold']}"], f"{bad_files['gold']}:2: expected: expected one of"),
        # a file that is missing named with its setting, alone and in the chain (the reward stage read its gold
        # items after training)
        (["sft", f"--sft.model={model}", f"--sft.train_data={root / 'nosuch.jsonl'}"],
         f"{root / 'nosuch.jsonl'}: file: not found (sft.train_data)"),
        (["run", f"--reward.gold={root / 'gold.jsonl'}"], f"{root / 'gold.jsonl'}: file: not found (reward.gold)"),
    ]
    for words, message in cases:
        assert cli([*words, *common]) == 2, words
        error = capsys.readouterr().err
        assert error.startswith(f"error: {message}") or message in error, (words, error)
        assert len(error.strip().splitlines()) == 1, error
        assert tree_digest(root) == before, words

    assert cli(["label", "--db", "foo", "stats"]) == 2
    assert capsys.readouterr().err.startswith("error: label store 'foo': not a database URL")
    assert cli(["label", "--db", "", "users", "list"]) == 2  # ($DB unset in a script) not the default store, unsaid
    assert capsys.readouterr().err.startswith("error: --db is empty: give the label store's URL")
    for url, cause in ((f"sqlite:///{run}", "unable to open database file"),  # a folder
                       ("postgresql+psycopg://ann:secret@127.0.0.1:1/labels", "Connection refused"),
                       ("mysql://ann@127.0.0.1/labels", "No module named")):  # no driver installed
        assert cli(["label", "--db", url, "stats"]) == 2, url
        error = capsys.readouterr().err
        assert error.startswith("error: label store ") and "cannot open it" in error and cause in error, error
        assert len(error.strip().splitlines()) == 1 and "secret" not in error, error
    # another program's database, a text file, a store in memory (keeps nothing), an invalid SQLite URL: refused,
    # and nothing changed (the other database was given the store's tables and WAL journal)
    other, text, with_meta = root / "other.db", root / "text.db", root / "meta.db"
    with contextlib.closing(sqlite3.connect(other)) as connection:
        connection.execute("CREATE TABLE notes (line TEXT)")
        connection.commit()
    with contextlib.closing(sqlite3.connect(with_meta)) as connection:  # a table named as ours, another program's
        connection.execute("CREATE TABLE meta (name TEXT, created TEXT)")
        connection.commit()
    text.write_text('{"not": "a database"}\n')
    files_before = tree_digest(root)
    for url, message in ((f"sqlite:///{other}", f"{other} is a SQLite database but not a label store (its tables: "
                                                 "notes): check --db"),
                         (f"sqlite:///{text}", f"label store {text}: cannot open it (file is not a database)"),
                         (f"sqlite:///{with_meta}", f"{with_meta} is a SQLite database but not a label store"),
                         ("sqlite://", "a SQLite database in memory keeps nothing"),
                         ("sqlite:///:memory:", "a SQLite database in memory keeps nothing"),
                         ("sqlite://relative/labels.db", "cannot open it (Invalid SQLite URL")):
        for command in (["users", "list"], ["stats"]):
            assert cli(["label", "--db", url, *command]) == 2, url
            error = capsys.readouterr().err
            assert message in error and len(error.strip().splitlines()) == 1, error
    assert tree_digest(root) == files_before
    for made in (other, text, with_meta):
        made.unlink()
    store = root / "labels.db"
    assert cli(["label", "gold", str(bad_files["gold"]), "--db", f"sqlite:///{store}"]) == 2
    assert f"{bad_files['gold']}:2: expected" in capsys.readouterr().err
    assert tree_digest(root) == before and not store.exists()


def test_label_commands_refuse_blank_batches_nan_settings_and_a_judge_of_other_arguments(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    for batch, message in (("", "batch name '' (--batch): not empty, and no spaces around it"),
                           (" b1", "batch name ' b1' (--batch): not empty, and no spaces around it"),
                           ("b" * 129, f"batch name '{'b' * 40}...' (--batch) is 129 characters")):
        assert cli(["label", "--db", db, "gold", "data/gold_comparisons.jsonl", "--batch", batch]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "labels.db").exists()  # refused before a store was made for the import
    assert cli(["label", "--db", db, "gold", "data/gold_comparisons.jsonl"]) == 0
    gc.collect()  # the import's connections closed (SQLite folds its WAL into the file as the last one closes)
    before = tree_digest(tmp_path)
    for flag in ("--temperature", "--tie-margin", "--both-bad-floor"):  # NaN passed every check and voted b always
        assert cli(["label", "--db", db, "simulate", "--judge", "builtin:length", flag, "nan"]) == 2
        assert "must be numbers" in capsys.readouterr().err
    assert cli(["label", "--db", db, "simulate", "--judge", "json:dumps"]) == 2  # a function of other arguments
    error = capsys.readouterr().err
    assert error.startswith("error: judge json:dumps failed on a made-up answer (TypeError: ") and \
        len(error.strip().splitlines()) == 1, error
    assert tree_digest(tmp_path) == before
