"""Bad input to the commands that read files: one line naming the file, the row and the field, exit 2, and the
output root as it was (nothing locked, recorded, created or opened; `rlhf ppo`'s own case is in test_ppo_runs)."""
import hashlib
import json

import pytest

from pipeline.cli import main as cli


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
                                                                                         bad_files, capsys):
    root = tmp_path / "runs"
    run = root / "tiny"  # an earlier run of the same name, which a failed attempt must leave as it is
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"run": "tiny", "stages": {}}))
    (run / "notes.txt").write_text("earlier work")
    before = tree_digest(root)
    common = ["--config", "configs/tiny.yaml", f"--run.output_root={root}", "--run.tracking=none"]
    model = str(tiny_model_path)
    cases = [
        (["dpo", f"--dpo.model={model}", f"--dpo.preferences={bad_files['pairs']}"],
         f"{bad_files['pairs']}:2: rejected: is the same answer as 'chosen'"),
        (["eval", f"--eval.baseline={model}", f"--eval.policies=other={model}", "--eval.reward_model=none",
          f"--eval.prompts={bad_files['prompts']}"], f"{bad_files['prompts']}:2: prompt: missing"),
        (["eval", f"--eval.baseline={model}", f"--eval.policies=other={model}", "--eval.reward_model=none",
          "--eval.judge=builtin:nonesuch"], "builtin:nonesuch"),
        (["label", "collect", f"--labels.model={model}", f"--labels.prompts={bad_files['prompts']}"],
         f"{bad_files['prompts']}:2: prompt: missing"),
        (["label", "collect", f"--labels.model={model}", f"--labels.gold={bad_files['gold']}"],
         f"{bad_files['gold']}:2: expected: expected one of"),
        (["label", "collect", f"--labels.model={model}", "--labels.simulate_judge=nosuch:judge"], "nosuch:judge"),
        (["label", "collect", f"--labels.model={model}", "--labels.simulate_judge=", "--labels.min_votes=4"],
         "labels: min_votes (4) is more than overlap (3)"),  # people voting: the wait would never end
    ]
    for words, message in cases:
        assert cli([*words, *common]) == 2, words
        error = capsys.readouterr().err
        assert error.startswith(f"error: {message}") or message in error, (words, error)
        assert len(error.strip().splitlines()) == 1, error
        assert tree_digest(root) == before, words

    store = root / "labels.db"
    assert cli(["label", "gold", str(bad_files["gold"]), "--db", f"sqlite:///{store}"]) == 2
    assert f"{bad_files['gold']}:2: expected" in capsys.readouterr().err
    assert tree_digest(root) == before and not store.exists()
