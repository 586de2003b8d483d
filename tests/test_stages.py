"""The stage registry: one list (pipeline/stages.py) that the command line, `rlhf run`, the config sections, the
run folders and the manifest all use, under one name per stage; and the contract's input check, which names
every missing input at once, in pipeline order, before anything is written."""
import subprocess
import sys

import yaml

from pipeline import run as pipeline_run
from pipeline.cli import build_parser
from pipeline.cli import main as cli
from pipeline.stages import SECTIONS, STAGES
from tests.conftest import REPO


def test_every_stage_is_reachable_from_the_command_line_and_rlhf_run_under_one_name(capsys):
    names = [stage.name for stage in STAGES]
    assert names == ["sft", "preferences", "reward", "ppo", "dpo", "eval"]
    assert list(SECTIONS) == ["run", *names]
    assert pipeline_run.STAGES is STAGES
    parser = build_parser(STAGES)
    for stage in STAGES:
        args, rest = parser.parse_known_args([stage.name, "--config", "configs/tiny.yaml"])
        assert args.stage is stage and args.handler.__name__ == "run_stage" and rest == []
        assert SECTIONS[stage.name] is stage.config_class
    # the shipped configs have a section for every stage, under the stage's name
    for config in ("default.yaml", "tiny.yaml"):
        assert list(yaml.safe_load((REPO / "configs" / config).read_text())) == ["run", *names]
    # `rlhf STAGE --help` lists the stage's own section
    for stage in STAGES:
        try:
            cli([stage.name, "--help"])
        except SystemExit:
            pass
        assert f"--{stage.name}." in capsys.readouterr().out


def test_the_command_line_and_rlhf_run_do_not_import_each_other_and_label_commands_start_light():
    code = ("import sys, pipeline.cli; heavy = [m for m in ('pipeline.run', 'pipeline.stages', 'torch', "
            "'transformers') if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_every_missing_input_is_named_at_once_in_pipeline_order_and_nothing_is_written(tmp_path, tiny_model_path,
                                                                                       capsys):
    root = tmp_path / "runs"
    code = cli(["eval", "--config", "configs/tiny.yaml", f"--run.output_root={root}", "--run.tracking=none"])
    error = capsys.readouterr().err
    assert code == 2, error
    lines = error.strip().splitlines()
    assert lines[0] == "error: 3 inputs are missing:", error
    assert "no SFT model" in lines[1] and "rlhf sft --config" in lines[1]
    assert "no reward model" in lines[2] and "rlhf reward --config" in lines[2]
    assert "no policy to evaluate" in lines[3] and "rlhf ppo --config" in lines[3]
    assert not root.exists()
    # one missing input: one line, as before
    code = cli(["eval", "--config", "configs/tiny.yaml", f"--run.output_root={root}", "--eval.reward_model=none",
                f"--eval.baseline={tiny_model_path}", "--run.tracking=none"])
    error = capsys.readouterr().err
    assert code == 2 and len(error.strip().splitlines()) == 1 and "no policy to evaluate" in error, error
    assert not root.exists()
