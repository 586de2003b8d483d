import dataclasses

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
    assert "not valid YAML" in error(write(tmp_path, "sft: [unclosed\n"))
    assert error(tmp_path / "none.yaml") == f"{tmp_path / 'none.yaml'}: config file not found"


def test_errors_say_whether_the_file_or_the_command_line_is_wrong(tmp_path):
    path = write(tmp_path, "sft:\n  max_steps: 3\n")
    assert error(path, ["--sft.packing", "maybe"]).startswith("command line: sft.packing:")
    assert error(path, ["--sft.eval_fraction", "1"]) == \
        f"{path} with command-line overrides: sft: eval_fraction must be in [0, 1), got 1.0"
    assert "eval_strategy=steps needs held-out data" in error(None, ["--sft.eval_strategy", "steps",
                                                                      "--sft.eval_fraction", "0"])
    assert error(None, ["--run.name", "a/b"]) == "command line: run: name must be a plain folder name, got 'a/b'"


def test_bad_input_on_the_command_line_exits_2(capsys):
    from pipeline.cli import main as cli

    assert cli(["sft", "--config", "configs/tiny.yaml", "--run.name", "../x"]) == 2
    assert capsys.readouterr().err == ("error: configs/tiny.yaml with command-line overrides: run: name must be a "
                                       "plain folder name, got '../x'\n")


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
    assert coerce('{"k": 1}', dict | str | None) == {"k": 1}
    with pytest.raises(ValueError):
        coerce(1.5, int)


def test_precision_follows_the_hardware_unless_forced(monkeypatch):
    from rlhf import hardware

    monkeypatch.setattr(hardware, "detect_device", lambda: "cpu")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    assert SFTStageConfig(output_dir="/tmp/x").bf16 is False  # TRL's own default would be True
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert SFTStageConfig(output_dir="/tmp/x").bf16 is True
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    assert SFTStageConfig(output_dir="/tmp/x", precision="bf16").bf16 is True
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
