import dataclasses
import json

import pytest

from rlhf.config import RunConfig, coerce, hashed_settings, load_config
from rlhf.errors import ConfigError
from sft.config import SFTStageConfig
from tests.conftest import REPO

SECTIONS = {"run": RunConfig, "sft": SFTStageConfig}


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def error(path, overrides=()) -> str:
    from pipeline.stages import SECTIONS as EVERY_SECTION

    with pytest.raises(ConfigError) as caught:
        load_config(path, list(overrides), SECTIONS, EVERY_SECTION)
    return str(caught.value)


def test_yaml_sections_map_onto_the_dataclasses_and_overrides_win(tmp_path):
    path = write(tmp_path, "run:\n  name: a\nsft:\n  learning_rate: 2e-5\n  max_steps: 7\n  packing: false\n"
                           "reward:\n  anything: 1\n")
    config = load_config(path, ["--sft.max_steps", "9", "--run.name=b", "--sft.packing", "yes",
                                "--sft.warmup_steps", "3"], SECTIONS)
    sft, run = config["sft"], config["run"]
    assert (run.name, sft.learning_rate, sft.max_steps, sft.packing, sft.warmup_steps) == ("b", 2e-5, 9, True, 3)
    assert isinstance(sft.learning_rate, float)
    assert run.trackers == ["wandb", "trackio"]


def test_shipped_configs_parse():
    from pipeline.stages import SECTIONS as EVERY_SECTION

    for name in ("default.yaml", "tiny.yaml"):
        config = load_config(REPO / "configs" / name, [], EVERY_SECTION, EVERY_SECTION)
        assert config["sft"].max_steps > 0 and config["reward"].learning_rate > 0
        assert config["preferences"].simulate_judge and config["ppo"].total_episodes > 0 and config["dpo"].beta > 0
        assert config["eval"].judge == "builtin:length"
    arithmetic = load_config(REPO / "configs" / "arithmetic.yaml", [], EVERY_SECTION, EVERY_SECTION)
    assert arithmetic["ppo"].reward_function == arithmetic["eval"].judge == "builtin:final_number"
    assert arithmetic["ppo"].batch_size % arithmetic["ppo"].group_size == 0
    assert arithmetic["eval"].prompts == arithmetic["ppo"].eval_prompts == "data/arithmetic_eval.jsonl"


def test_unknown_key_names_the_close_match_and_the_valid_keys(tmp_path):
    message = error(write(tmp_path, "sft:\n  learning_rat: 1.0e-5\n"))
    assert message.startswith(f"{tmp_path / 'c.yaml'}: sft.learning_rat: unknown key (did you mean 'learning_rate'?)")
    assert "valid keys for 'sft': " in message and "train_data" in message and "num_train_epochs" in message


def test_unknown_section_and_foreign_overrides_are_refused(tmp_path):
    assert "unknown section 'sfy' (did you mean 'sft'?)" in error(write(tmp_path, "sfy:\n  a: 1\n"))
    assert "section 'labels' is now called 'preferences'" in error(write(tmp_path, "labels:\n  num_prompts: 1\n"))
    assert error(None, ["--ppo.kl_coef", "1"]) == "--ppo.kl_coef: this command takes only --run.*, --sft.*"
    assert error(None, ["--sft.max_steps"]) == "--sft.max_steps: missing value"
    assert error(None, ["stray"]).startswith("unexpected argument 'stray'")


def test_bad_values_name_the_field(tmp_path):
    assert error(None, ["--sft.max_steps", "many"]) == "command line: sft.max_steps: expected an integer, got 'many'"
    assert error(None, ["--sft.packing", "maybe"]) == "command line: sft.packing: expected true or false, got 'maybe'"
    assert "tracking: unknown tracker(s) tensorboard" in error(None, ["--run.tracking", "tensorboard"])
    for setting in ("--sft.num_samples", "--sft.sample_max_new_tokens"):  # -1 answered 319 prompts, or crashed
        assert "num_samples must be 0 (none) or more and sample_max_new_tokens at least 1" in error(None, [setting,
                                                                                                           "-1"])
    unclosed = write(tmp_path, "sft: [unclosed\n")
    assert error(unclosed) == (f"{unclosed}:2: not valid YAML: while parsing a flow sequence; expected ',' or ']', "
                               "but got '<stream end>'")
    assert error(tmp_path / "none.yaml") == f"{tmp_path / 'none.yaml'}: config file not found"
    # a text key left empty is not the text "None"; a list with an unclosed bracket is not a traceback
    empty = write(tmp_path, "sft:\n  model:\n")
    assert error(empty) == f"{empty}: sft.model: expected a string, got nothing (an empty or null value; write '' " \
        "for none)"
    with pytest.raises(ValueError, match=r"^not a YAML value \(.*\): '\[sigmoid'$"):
        coerce("[sigmoid", list[str])  # e.g. --dpo.loss_type '[sigmoid'
    off = write(tmp_path, "run:\n  project: off\n")  # YAML's off is false: not the text "False"
    assert error(off) == f"{off}: run.project: expected a string, got false (YAML reads yes/no/on/off as " \
        "true/false: quote it)"
    numbered = write(tmp_path, "sft:\n  5: 2\n")  # a number as a key: named, not a TypeError
    assert error(numbered).startswith(f"{numbered}: sft.5: unknown key")
    assert coerce("false", str | bool) is False and coerce("no", str | bool) == "no"  # was the text "false"
    assert coerce("{min_lr: 0.001}", dict | str) == {"min_lr": 0.001}  # YAML's flow mapping, as lists are read
    assert coerce('{"min_lr": 1e-6}', dict | str) == {"min_lr": 1e-6}  # JSON first: YAML reads 1e-6 as text
    assert coerce("{min_lr: 1e-6, name: 1e-6x}", dict | str) == {"min_lr": 1e-6, "name": "1e-6x"}  # and in YAML
    in_file = write(tmp_path, "sft:\n  lr_scheduler_kwargs: {min_lr: 1e-6}\n")
    assert load_config(in_file, [], {"sft": SFTStageConfig})["sft"].lr_scheduler_kwargs == {"min_lr": 1e-6}
    from pipeline.stages import SECTIONS as EVERY_SECTION

    for stage in ("sft", "reward", "dpo"):  # -1 cut every message to nothing
        with pytest.raises(ConfigError, match=r"max_length must be at least 1 \(or null: no limit\), got -1"):
            load_config(None, [f"--{stage}.max_length=-1"], EVERY_SECTION)


def test_only_plain_decimals_are_numbers_so_a_name_keeps_the_text_written(tmp_path):
    """YAML 1.1 reads 0612 as the octal 394 and 1:30 as 90: a run named 0612 wrote to runs/394."""
    path = write(tmp_path, "run:\n  name: 0612\npreferences:\n  batch: 1:30\nsft:\n  max_steps: 0012\n")
    from pipeline.stages import SECTIONS as EVERY_SECTION

    config = load_config(path, ["--reward.max_steps=010"], EVERY_SECTION)
    assert (config["run"].name, config["preferences"].batch) == ("0612", "1:30")
    assert (config["sft"].max_steps, config["reward"].max_steps) == (12, 10)  # numbers read in decimal


def test_errors_say_whether_the_file_or_the_command_line_is_wrong(tmp_path):
    path = write(tmp_path, "sft:\n  max_steps: 3\n")
    assert error(path, ["--sft.packing", "maybe"]).startswith("command line: sft.packing:")
    assert error(path, ["--sft.eval_fraction", "1"]) == \
        f"{path} with command-line overrides: sft: eval_fraction must be in [0, 1), got 1.0"
    assert "eval_strategy=steps needs held-out data" in error(None, ["--sft.eval_strategy", "steps",
                                                                      "--sft.eval_fraction", "0"])
    assert error(None, ["--run.name", "a/b"]) == "command line: run: name must be a plain folder name (letters, " \
        "digits, '.', '_', '-'; not starting with '.'), got 'a/b'"
    # what wandb would refuse after the first stage had started: found before anything is written
    assert error(None, ["--run.name", "r" * 101]) == "command line: run: name must be at most 100 characters (the " \
        "trackers name each stage's artifact `<name>-<stage>` in 128), got 101"
    # not a number that a range check catches (nan < 0 is false: eval sampled at "temperature nan", greedily)
    for bad in ("nan", "inf", "-inf", "1e400"):
        assert error(None, ["--sft.learning_rate", bad]) == f"command line: sft.learning_rate: expected a finite " \
            f"number, got '{bad}'"
    assert error(write(tmp_path, "sft:\n  learning_rate: .nan\n"), []).endswith(
        "sft.learning_rate: expected a finite number, got nan")
    for project in ("team/rlhf", " ", "a" * 129, "a:b"):
        assert error(None, ["--run.project", project]) == "command line: run: project must be 1 to 128 characters, " \
            f"none of / \\ # ? % :, got '{project}'"


def test_bad_input_on_the_command_line_exits_2(capsys):
    from pipeline.cli import main as cli

    assert cli(["sft", "--config", "configs/tiny.yaml", "--run.name", "../x"]) == 2
    assert capsys.readouterr().err == ("error: configs/tiny.yaml with command-line overrides: run: name must be a "
                                       "plain folder name (letters, digits, '.', '_', '-'; not starting with "
                                       "'.'), got '../x'\n")


def test_stage_help_lists_our_fields(capsys):
    from pipeline.cli import main as cli

    with pytest.raises(SystemExit):
        cli(["sft", "--help"])
    out = capsys.readouterr().out
    assert "--sft.train_data (default: 'data/sft_demonstrations.jsonl')" in out and "--run.tracking" in out


def test_coerce_follows_the_annotation():
    assert coerce("3", int | None) == 3 and coerce("none", int | None) is None
    assert coerce("1e-3", float) == 0.001 and coerce(2, float) == 2.0
    assert coerce("a,b", list[str]) == ["a", "b"] and coerce("[1, 2]", list[int]) == [1, 2]
    assert coerce("", list[str]) == [] and coerce(" ", list[str]) == []  # no items, not one empty item
    with pytest.raises(ValueError, match="an empty item in the comma-separated list 'a,,b'"):
        coerce("a,,b", list[str])
    assert coerce('{"k": 1}', dict | str | None) == {"k": 1}
    with pytest.raises(ValueError):
        coerce(1.5, int)


def test_precision_follows_the_hardware_unless_forced(monkeypatch):
    import torch

    from rlhf import hardware

    monkeypatch.setattr(hardware, "detect_device", lambda: "cpu")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    assert SFTStageConfig(output_dir="/tmp/x").bf16 is False  # TRL's own default would be True
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert SFTStageConfig(output_dir="/tmp/x").bf16 is True
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    assert SFTStageConfig(output_dir="/tmp/x", precision="bf16").bf16 is True
    for flags, dtype in (({"bf16": False}, torch.float32), ({"bf16": True}, torch.bfloat16)):  # given outright
        config = SFTStageConfig(output_dir="/tmp/x", precision="bf16" if dtype == torch.float32 else "auto", **flags)
        assert config.hardware.dtype == dtype and "set in config" in config.hardware.reason, flags
    config = SFTStageConfig(output_dir="/tmp/x")
    assert config.gradient_checkpointing_auto and not config.gradient_checkpointing
    assert (config.packing, config.train_sampling_strategy) == (False, "length_grouped")
    monkeypatch.setattr(hardware, "detect_device", lambda: "cuda")
    gpu = SFTStageConfig(output_dir="/tmp/x", precision="fp32")  # transformers checks bf16 against real GPUs
    assert gpu.packing and gpu.train_sampling_strategy == "random"


def test_the_config_hash_covers_what_changes_a_stage_output_and_not_its_evaluation_only_settings():
    from pipeline.run import config_hash
    from reward.config import RewardStageConfig

    base = RewardStageConfig(model="m", preferences="p")
    assert config_hash(dataclasses.replace(base, calibration_bins=5, gold="", resume=True)) == config_hash(base)
    assert config_hash(dataclasses.replace(base, learning_rate=1e-3)) != config_hash(base)
    assert "calibration_bins" not in hashed_settings(base) and "learning_rate" in hashed_settings(base)


def test_a_round_section_applies_in_its_round_only_between_the_file_and_the_command_line(tmp_path):
    from pipeline.stages import SECTIONS as EVERY_SECTION
    from reward.config import RewardStageConfig

    sections = {"run": RunConfig, "reward": RewardStageConfig}
    path = write(tmp_path, "reward:\n  learning_rate: 2e-5\n  max_steps: 7\nround-2:\n  reward:\n    max_steps: 3\n"
                           "    warmup_steps: 2\n")
    first = load_config(path, [], sections, EVERY_SECTION)
    second = load_config(path, ["--run.round=2", "--reward.warmup_steps=5"], sections, EVERY_SECTION)
    assert (first["reward"].max_steps, first["reward"].warmup_steps) == (7, 0)
    assert (second["run"].round, second["reward"].learning_rate, second["reward"].max_steps,
            second["reward"].warmup_steps) == (2, 2e-5, 3, 5)
    bad = write(tmp_path, "round-2:\n  reward:\n    max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml \(round-2\): reward.max_stepz: unknown key"):
        load_config(bad, ["--run.round", "2"], sections, EVERY_SECTION)


@pytest.mark.parametrize("text, message", [
    ("round-1:\n  reward: {}\n", "round sections start at round-2"),
    ("round-2:\n  rewrad: {}\n", "round-2.rewrad: not a stage of online rounds (did you mean 'reward'?)"),
    ("round-2:\n  run: {rounds: 3}\n", "round-2.run: not a stage of online rounds"),
    ("round-2:\n  sft: {max_steps: 3}\n", "round-2.sft: not a stage of online rounds; a round section holds "
                                           "preferences, reward, ppo, dpo, eval (sft runs once, in round 1)"),
    ("round-2: 3\n", "section 'round-2' must be a mapping of stage sections"),
    ("round-2:\n  reward: 3\n", "round-2.reward must be a mapping of keys to values"),
    ("run:\n  rounds: 0\n", "rounds and round must be at least 1"),
    ("round-02:\n  reward: {}\n", "unknown section 'round-02'"),  # was accepted, and read by no round
])
def test_bad_round_settings_are_refused_with_the_file_and_the_section(tmp_path, text, message):
    assert message in error(write(tmp_path, text))


def test_settings_read_by_later_rounds_only_are_outside_round_1s_config_hash():
    from preference_ui.config import PreferencesStageConfig
    from reward.config import RewardStageConfig

    for config, field, value in ((PreferencesStageConfig(), "round_budget", 64), (RewardStageConfig(), "round_init",
                                                                                   "previous")):
        changed = dataclasses.replace(config, **{field: value})
        assert hashed_settings(changed, 1) == hashed_settings(config, 1)
        assert hashed_settings(changed, 2) != hashed_settings(config, 2)


def test_a_label_store_password_is_neither_recorded_nor_hashed_nor_printed():
    from pipeline.run import config_hash, shown
    from preference_ui.config import PreferencesStageConfig

    first = PreferencesStageConfig(db="postgresql+psycopg://lab:first-secret@db.example:5432/labels")
    rotated = PreferencesStageConfig(db="postgresql+psycopg://lab:new%40secret@db.example:5432/labels")
    assert hashed_settings(first)["db"] == "postgresql+psycopg://lab:***@db.example:5432/labels"
    assert "secret" not in json.dumps(hashed_settings(rotated))  # the manifest's copy and the trackers'
    assert config_hash(first) == config_hash(rotated)  # a new password reruns nothing
    assert config_hash(first) != config_hash(PreferencesStageConfig(db="postgresql+psycopg://lab:x@other/labels"))
    assert shown("--preferences.db=postgresql://lab:first-secret@db/labels") == \
        "--preferences.db=postgresql://lab:***@db/labels"
    assert shown("--preferences.db=sqlite:////tmp/labels.db") == "--preferences.db=sqlite:////tmp/labels.db"


def test_a_key_or_section_given_twice_a_config_not_in_utf8_and_a_missing_named_file_are_config_errors(tmp_path):
    twice = write(tmp_path, "sft:\n  learning_rate: 1.0e-3\n  learning_rate: 2.0e-3\n")  # YAML kept the last
    assert error(twice) == f"{twice}:3: not valid YAML: 'learning_rate' is given twice (lines 2 and 3)"
    sections = write(tmp_path, "sft:\n  max_steps: 2\nrun:\n  name: a\nsft:\n  learning_rate: 1.0e-3\n")
    assert error(sections) == f"{sections}:5: not valid YAML: 'sft' is given twice (lines 1 and 5)"
    merged = write(tmp_path, "run: &shared\n  name: a\nsft:\n  max_steps: 2\n")  # anchors still work
    assert load_config(merged, [], SECTIONS)["run"].name == "a"
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("run:\n  name: café\n".encode("latin-1"))
    assert error(latin) == f"{latin}: not UTF-8 text (byte 0xe9 at byte 16)"
    missing = tmp_path / "accelerate.json"
    assert error(None, [f"--sft.accelerator_config={missing}"]).startswith("command line: sft: ")


def test_settings_the_pipeline_sets_itself_are_refused_not_ignored(tmp_path):
    given = write(tmp_path, "sft:\n  output_dir: /big/disk\n")
    assert error(given) == (f"{given}: sft.output_dir: set by the pipeline itself (it would be ignored); use "
                            "run.output_root (checkpoints go to runs/<name>/.<stage>.partial/)")
    assert error(None, ["--sft.report_to=wandb"]) == ("command line: sft.report_to: set by the pipeline itself (it "
                                                      "would be ignored); use run.tracking")
