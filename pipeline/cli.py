"""The `rlhf` command: one subcommand per stage, plus `rlhf models`.

Stage commands read one YAML config (`--config`) and take `--section.field value` overrides for any field of
the sections they use. Errors in the user's input (data, config, model spec) print one line and exit with 2.
"""
import argparse
import dataclasses
import errno
import importlib
import logging
import os
import sys
from pathlib import Path

from rlhf.errors import UserError

# OS errors on a path that no retry fixes: permissions, a file where a folder should be, a full or read-only disk
PATH_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENOSPC, errno.EROFS, errno.EDQUOT,
               errno.ENAMETOOLONG}

# stage command -> (help, its config class, its main(config, run)); imported only when the command runs.
STAGES = {
    "sft": ("supervised fine-tuning (TRL SFTTrainer)", "sft.config:SFTStageConfig", "sft.train:main"),
    "reward": ("reward model on the label export (TRL RewardTrainer)", "reward.config:RewardStageConfig",
               "reward.train:main"),
    "ppo": ("PPO against the reward model (our trainer on accelerate)", "ppo.config:PPOStageConfig",
            "ppo.trainer:main"),
    "dpo": ("DPO on the label export or on-policy pairs (TRL DPOTrainer)", "ppo.dpo_config:DPOStageConfig",
            "ppo.dpo:main"),
    "eval": ("policies against the SFT model on held-out prompts, and the run's report",
             "evaluation.config:EvalStageConfig", "evaluation.evaluate:main"),
}
# `rlhf STAGE ACTION`: other things a stage's command does with the same config.
STAGE_ACTIONS = {"reward": {"eval": ("reward.evaluate:main",
                                      "evaluates the published reward model again (eval.md and its plots)")}}
LABELS_CONFIG = "preference_ui.config:LabelsConfig"
TRL_FIELDS_NOTE = {
    "sft": "--sft.learning_rate, --sft.num_train_epochs, --sft.max_steps, --sft.per_device_train_batch_size, "
           "--sft.gradient_accumulation_steps, --sft.warmup_steps, --sft.lr_scheduler_type, --sft.seed",
    "reward": "--reward.learning_rate, --reward.num_train_epochs, --reward.max_steps, "
              "--reward.per_device_train_batch_size, --reward.center_rewards_coefficient, --reward.seed",
    "dpo": "--dpo.beta, --dpo.loss_type, --dpo.learning_rate, --dpo.num_train_epochs, --dpo.max_steps, "
           "--dpo.per_device_train_batch_size, --dpo.precompute_ref_log_probs, --dpo.seed",
}


def load(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def fields_help(section: str, cls) -> str:
    """The fields a class defines or re-defaults, with their help; inherited TRL fields are documented by TRL."""
    ours = set().union(*(vars(base).get("__annotations__", {}) for base in cls.__mro__
                         if base.__module__.split(".")[0] not in ("trl", "transformers")))
    own = [f for f in dataclasses.fields(cls) if f.name in ours]
    return "\n".join(f"  --{section}.{f.name} (default: {f.default!r})\n      {f.metadata.get('help', '')}"
                     + (" Evaluation only: not in the config hash." if f.metadata.get("hashed") is False else "")
                     for f in own)


class StageHelp(argparse.Action):
    """`rlhf STAGE --help`: the usual help plus the stage's config fields (this imports the stage)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="show this help, with every config field, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from rlhf.config import RunConfig

        stage = parser.prog.split()[-1]
        section, config_class = (("labels", LABELS_CONFIG) if stage in ("sample", "serve", "collect")
                                 else (stage, STAGES[stage][1]))
        parser.print_help()
        print(f"\nconfig fields (YAML keys under run: / {section}:, or --section.field value):\n"
              f"{fields_help('run', RunConfig)}\n{fields_help(section, load(config_class))}")
        if stage in TRL_FIELDS_NOTE:
            print(f"  ... and every field of the TRL config it extends, e.g. {TRL_FIELDS_NOTE[stage]}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="The RLHF pipeline: sft -> labels -> reward -> ppo/dpo "
                                                              "-> eval. Run `rlhf COMMAND --help` for details.")
    commands = parser.add_subparsers(dest="command", required=True)

    models_parser = commands.add_parser("models", help="list or prepare bundled models")
    models_commands = models_parser.add_subparsers(dest="models_command", required=True)
    models_commands.add_parser("list", help="bundled models and whether they are prepared")
    prepare = models_commands.add_parser("prepare", help="build a bundled model's cached folder (once)")
    prepare.add_argument("name", help="a bundled model name (see `rlhf models list`)")
    models_parser.set_defaults(handler=run_models)

    label = commands.add_parser("label", help="preference collection: sample, serve, users, gold, simulate, stats, "
                                               "export")
    label.add_argument("--db", help="database URL (default: with --config the run's store, runs/NAME/labels.db; "
                                    "without, $RLHF_DB_URL or sqlite:///runs/labels.db)")
    label_commands = label.add_subparsers(dest="label_command", required=True)
    users = label_commands.add_parser("users", help="add, list, disable or enable labellers and admins")
    users_commands = users.add_subparsers(dest="users_command", required=True)
    add = users_commands.add_parser("add", help="add a user; the password is read from the terminal or stdin")
    add.add_argument("name")
    add.add_argument("--role", choices=["labeller", "admin"], default="labeller")
    users_commands.add_parser("list", help="every user with role and state")
    disable = users_commands.add_parser("disable", help="stop a user from logging in (their votes stay)")
    disable.add_argument("name")
    enable = users_commands.add_parser("enable", help="let a disabled user log in again")
    enable.add_argument("name")
    sample = label_commands.add_parser("sample", help="k responses per prompt from a model -> comparisons",
                                       add_help=False)
    sample.add_argument("-h", "--help", action=StageHelp)
    sample.add_argument("--config", help="YAML run config (its labels: section)")
    sample.add_argument("--select", choices=["all", "uncertain"],
                        help="queue every candidate pair, or those the reward model is least sure about")
    sample.add_argument("--reward-model", help="with --select uncertain: the reward model folder")
    sample.add_argument("--select-count", type=int, help="with --select uncertain: how many comparisons to queue")
    serve = label_commands.add_parser("serve", help="the labelling app in the browser (Gradio)", add_help=False)
    serve.add_argument("-h", "--help", action=StageHelp)
    serve.add_argument("--config", help="YAML run config (its labels: section: overlap, gold_rate, guidelines, ...)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--batch", help="hand out only this batch (gold items are always mixed in; default: all)")
    serve.add_argument("--no-auth", action="store_true",
                       help="no sign-in, everyone acts as --user; only allowed on 127.0.0.1")
    serve.add_argument("--user", help="with --no-auth: the existing user everyone acts as")
    serve.add_argument("--ssl-keyfile", help="serve HTTPS with this key (passwords cross the network otherwise)")
    serve.add_argument("--ssl-certfile", help="... and this certificate")
    collect = label_commands.add_parser("collect", help="sample, vote (simulated or people) and export: the "
                                                         "preference stage of `rlhf run`", add_help=False)
    collect.add_argument("-h", "--help", action=StageHelp)
    collect.add_argument("--config", help="YAML run config (its labels: section)")
    gold = label_commands.add_parser("gold", help="import comparisons with a known answer (attention checks)")
    gold.add_argument("file", help="JSONL/JSON/CSV/Parquet rows: id, prompt, a, b, expected (a|b|tie|both_bad)")
    gold.add_argument("--batch", default="gold", help="batch name for the gold items (default: gold)")
    simulate = label_commands.add_parser("simulate", help="simulated labellers vote through the store")
    simulate.add_argument("--judge", required=True, help="builtin:readability|length|keywords or module:function")
    simulate.add_argument("--labellers", type=int, default=3, help="how many simulated labellers (sim/<judge>/<i>)")
    simulate.add_argument("--batch", help="only this batch of comparisons (default: all)")
    simulate.add_argument("--temperature", type=float, default=1.0,
                          help="Bradley-Terry temperature in judge-score units; 0 always picks the better one")
    simulate.add_argument("--tie-margin", type=float, default=0.0, help="score gaps below this are ties")
    simulate.add_argument("--both-bad-floor", type=float, help="both scores below this: both_bad")
    simulate.add_argument("--noise", type=float, default=0.0, help="chance of a uniformly random vote instead")
    simulate.add_argument("--seed", type=int, default=0)
    stats = label_commands.add_parser("stats", help="progress, agreement and per-labeller throughput")
    stats.add_argument("--batch", help="only this batch of comparisons (default: all)")
    export = label_commands.add_parser("export", help="votes -> a saved HF preference dataset (TRL format)")
    export.add_argument("--out", required=True, help="folder to write (refused if it holds a different export)")
    export.add_argument("--batch", help="only this batch of comparisons (default: all)")
    export.add_argument("--min-votes", type=int, default=1, help="leave out comparisons with fewer votes")
    for command in (add, users_commands.choices["list"], disable, enable, sample, serve, collect, gold, simulate, stats,
                    export):
        # --db is accepted after the subcommand too (`rlhf label serve --db URL`); SUPPRESS keeps an earlier one.
        command.add_argument("--db", default=argparse.SUPPRESS, help="database URL (as `rlhf label --db`)")
    for command in (add, users_commands.choices["list"], disable, enable, gold, simulate, stats, export):
        command.add_argument("--config", help="YAML run config: its run's label store (runs/NAME/labels.db, or its "
                                              "labels.db)")
    label.set_defaults(handler=run_label)

    run = commands.add_parser("run", help="every stage in order: sft, labels, reward, ppo, dpo, eval (skips what is "
                                          "up to date, resumes what was cut short)")
    run.add_argument("--config", default="configs/default.yaml", help="YAML run config (default: %(default)s)")
    run.add_argument("--from", dest="start_from", help="rerun this stage and every one after it")
    run.add_argument("--launcher", choices=["python", "accelerate"], default="python",
                     help="how training stages start: one process, or `accelerate launch`")
    run.add_argument("--accelerate_config", help="with --launcher accelerate: configs/accelerate/*.yaml")
    run.set_defaults(handler=run_pipeline)

    for stage, (help_text, _, _) in STAGES.items():
        actions = "".join(f" `rlhf {stage} {action} --config ...` {what}."
                          for action, (_, what) in STAGE_ACTIONS.get(stage, {}).items())
        command = commands.add_parser(stage, help=help_text, add_help=False,
                                      description=f"{help_text}. Overrides: --section.field value.{actions}")
        command.add_argument("-h", "--help", action=StageHelp)
        command.add_argument("--config", help="YAML run config (configs/default.yaml, configs/tiny.yaml)")
        command.set_defaults(handler=run_stage, stage=stage)
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


def run_label(args, rest) -> int:
    from rlhf.datasets import load_rows
    from rlhf.store import Store

    if args.label_command in ("sample", "serve", "collect"):
        return run_label_with_config(args, rest)
    if rest:
        raise UserError(f"unexpected arguments: {' '.join(rest)}")
    gold = load_rows(args.file, "gold") if args.label_command == "gold" else None  # checked before the store opens
    adds_data = args.label_command == "gold" or getattr(args, "users_command", None) == "add"
    store = Store(label_store_url(args), create=adds_data)
    if store.created:
        print(f"created the label store {store.url}")
    if args.label_command == "gold":
        from preference_ui.gold import import_gold

        summary = import_gold(store, args.file, args.batch, gold)
        print(f"batch '{summary['batch']}': {summary['items']} gold comparisons"
              f"{' (already imported)' if summary['unchanged'] else ''}")
    elif args.label_command == "simulate":
        from preference_ui.simulate import LabellerModel, simulate

        model = LabellerModel(args.temperature, args.tie_margin, args.both_bad_floor, args.noise)
        counts = simulate(store, args.judge, args.labellers, model, args.batch, args.seed)
        print(" ".join(f"{choice}={count}" for choice, count in counts.items()))
    elif args.label_command == "stats":
        from preference_ui.stats import format_stats, stats

        print(format_stats(stats(store, args.batch)))
    elif args.label_command == "export":
        from rlhf.label_export import export

        manifest = export(store, args.out, args.batch, args.min_votes)
        state = "unchanged" if manifest.get("unchanged") else "written"
        print(f"{args.out}: {manifest['rows']} pairs ({manifest['ties']} ties, {manifest['both_bad']} both bad), "
              f"content hash {manifest['content_hash']}, {state}")
    elif args.users_command == "add":
        store.add_user(args.name, args.role, read_password())
        print(f"added {args.role} {args.name}")
    elif args.users_command in ("disable", "enable"):
        store.set_disabled(args.name, args.users_command == "disable")
        print(f"{args.users_command}d {args.name}")
    else:
        for user in store.users():
            print(f"{user.name:24} {user.role:9} {'disabled' if user.disabled else 'active'}")
    return 0


def label_store_url(args) -> str:
    """--db; else with --config the run's label store; else $RLHF_DB_URL or sqlite:///runs/labels.db."""
    from rlhf.config import RunConfig, load_config
    from rlhf.store import database_url, run_store_url

    if args.db or not getattr(args, "config", None):
        return database_url(args.db)
    sections = load_config(args.config, [], {"run": RunConfig, "labels": load(LABELS_CONFIG)})
    return run_store_url(sections["run"].output_root, sections["run"].name, sections["labels"].db or None)


def run_label_with_config(args, rest) -> int:
    """`label sample`, `serve` and `collect` read the labels: section of a run config, with overrides; with a
    --config, the run's label store unless --db (or the section's db) names another."""
    from rlhf.config import RunConfig, load_config
    from rlhf.store import Store, run_store_url

    if args.label_command == "sample":  # the short flags are the labels: fields of the same name
        rest = rest + [item for flag, value in (("select", args.select), ("reward_model", args.reward_model),
                                                ("select_count", args.select_count)) if value is not None
                       for item in (f"--labels.{flag}", str(value))]
    sections = load_config(args.config, rest, {"run": RunConfig, "labels": load(LABELS_CONFIG)})
    labels, run = sections["labels"], sections["run"]
    labels.db = args.db or labels.db
    # with a run config, sample and serve use the run's store; collect finds that store itself, so its config
    # (which `rlhf run` hashes to tell what is up to date) stays as written
    if args.config and args.label_command != "collect":
        labels.db = run_store_url(run.output_root, run.name, labels.db or None)
    if args.label_command in ("sample", "collect"):
        load(f"preference_ui.{args.label_command}:main")(labels, run)
        return 0
    from preference_ui.app import check_host, serve

    check_host(args.host, auth=not args.no_auth)
    serve(Store(labels.db or None, create=False), labels, args.host, args.port, auth=not args.no_auth,
          local_user=args.user, batch=args.batch, ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
          export_root=Path(run.output_root) / "exports")
    return 0


def read_password() -> str:
    """From the terminal without echo, or the first line of stdin when it is not a terminal (scripts, CI)."""
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise UserError("the passwords differ")
        return password
    return sys.stdin.readline().rstrip("\n")


def run_stage(args, rest) -> int:
    from rlhf.config import RunConfig, load_config

    _, config_class, stage_main = STAGES[args.stage]
    actions = STAGE_ACTIONS.get(args.stage, {})
    if rest and not rest[0].startswith("-"):
        if rest[0] not in actions:
            raise UserError(f"rlhf {args.stage}: unknown action '{rest[0]}'"
                            + (f" (actions: {', '.join(actions)})" if actions else ""))
        stage_main, rest = actions[rest[0]][0], rest[1:]
    sections = load_config(args.config, rest, {"run": RunConfig, args.stage: load(config_class)})
    load(stage_main)(sections[args.stage], sections["run"])
    close_process_group()
    return 0


def close_process_group() -> None:
    """Under a multi-process launcher, shuts the process group down before the interpreter exits: left to exit
    teardown, gloo's threads can outlive it and abort the process after a finished stage."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_pipeline(args, rest) -> int:
    from pipeline.run import main as run_all

    return run_all(args.config, rest, args.start_from, args.launcher, args.accelerate_config)


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
    except OSError as err:
        if err.errno not in PATH_ERRORS:
            raise
        # a path the user chose (an output root, a store) that cannot be written: the cause, not a traceback
        print(f"error: {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
