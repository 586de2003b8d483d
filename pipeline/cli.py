"""The `rlhf` command: one subcommand per stage, plus `rlhf models`.

Stage commands read one YAML config (`--config`) and take `--section.field value` overrides for any field of
the sections they use. Errors in the user's input (data, config, model spec) print one line and exit with 2.
"""
import argparse
import dataclasses
import logging
import os
import sys

from rlhf.errors import UserError

STAGE_SECTIONS = {"sft": "sft.config:SFTStageConfig"}


def stage_config_class(stage: str):
    module, name = STAGE_SECTIONS[stage].split(":")
    return getattr(__import__(module, fromlist=[name]), name)


def own_fields_help(cls) -> str:
    """The fields a stage class adds or re-defaults, with their help; the rest are TRL's, documented there."""
    own = [f for f in dataclasses.fields(cls) if f.name in vars(cls).get("__annotations__", {})]
    lines = [f"  --{cls.__module__.split('.')[0]}.{f.name} (default: {f.default!r})\n      {f.metadata.get('help', '')}"
             for f in own]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="The RLHF pipeline: sft -> labels -> reward -> ppo/dpo "
                                                              "-> eval. Run `rlhf COMMAND --help` for details.")
    commands = parser.add_subparsers(dest="command", required=True)

    models_parser = commands.add_parser("models", help="list or prepare bundled models")
    models_commands = models_parser.add_subparsers(dest="models_command", required=True)
    models_commands.add_parser("list", help="bundled models and whether they are prepared")
    prepare = models_commands.add_parser("prepare", help="convert a bundled model into a cached folder (once)")
    prepare.add_argument("name", help="a bundled model name (see `rlhf models list`)")
    models_parser.set_defaults(handler=run_models)

    from rlhf.config import RunConfig
    sft = commands.add_parser(
        "sft", help="supervised fine-tuning (TRL SFTTrainer)", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides, as --section.field value (or in the YAML under the section):\n"
               + own_fields_help(RunConfig).replace("--rlhf.", "--run.") + "\n"
               + own_fields_help(stage_config_class("sft"))
               + "\n  ... and every field of trl.SFTConfig / transformers.TrainingArguments, e.g. "
                 "--sft.learning_rate, --sft.num_train_epochs, --sft.max_steps, --sft.per_device_train_batch_size")
    sft.add_argument("--config", help="YAML run config (configs/default.yaml, configs/tiny.yaml)")
    sft.set_defaults(handler=run_stage, stage="sft")
    return parser


def run_models(args, rest) -> int:
    from rlhf import models

    if rest:
        raise UserError(f"unexpected arguments: {' '.join(rest)}")
    if args.models_command == "prepare":
        print(models.prepare_bundled(args.name))
        return 0
    for row in models.list_models():
        state = "prepared" if row["prepared"] else "not prepared"
        print(f"{row['name']:24} {state:13} {row['path']}\n{'':24} {row['description']}")
    return 0


def run_stage(args, rest) -> int:
    from rlhf.config import RunConfig, load_config

    sections = load_config(args.config, rest, {"run": RunConfig, args.stage: stage_config_class(args.stage)})
    if args.stage == "sft":
        from sft.train import main as sft_main

        sft_main(sections["sft"], sections["run"])
    return 0


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    setup_logging()
    try:
        return args.handler(args, rest)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
