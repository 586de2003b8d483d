"""The `rlhf` command: one subcommand per stage, plus `rlhf models`.

Stage commands read one YAML config (`--config`) and take `--section.field value` overrides for any field of
the sections they use. Errors in the user's input (data, config, model spec) print one line and exit with 2.
"""
import argparse
import ctypes
import dataclasses
import errno
import logging
import os
import signal
import sys
from pathlib import Path

from rlhf.errors import UserError

# OS errors on a path that no retry fixes: permissions, a file where a folder should be, a full or read-only disk
PATH_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOSPC, errno.EROFS,
               errno.EDQUOT, errno.ENAMETOOLONG}

# commands that need no stage module: they start without importing torch and transformers
LIGHT_COMMANDS = ("label", "models")
STAGE_OF_A_RUN = "RLHF_STAGE_OF_A_RUN"  # set for the stages rlhf run starts, and so for their launchers' children
TRL_FIELDS_NOTE = {
    "sft": "--sft.learning_rate, --sft.num_train_epochs, --sft.max_steps, --sft.per_device_train_batch_size, "
           "--sft.gradient_accumulation_steps, --sft.warmup_steps, --sft.lr_scheduler_type, --sft.seed",
    "reward": "--reward.learning_rate, --reward.num_train_epochs, --reward.max_steps, "
              "--reward.per_device_train_batch_size, --reward.center_rewards_coefficient, --reward.seed",
    "dpo": "--dpo.beta, --dpo.loss_type, --dpo.learning_rate, --dpo.num_train_epochs, --dpo.max_steps, "
           "--dpo.per_device_train_batch_size, --dpo.precompute_ref_log_probs, --dpo.seed",
}


def read_sections(path, overrides: list[str], names: list[str]) -> dict:
    """The named sections of a run config, with overrides; every section in the file must be a known one."""
    from pipeline.stages import SECTIONS
    from rlhf.config import load_config

    return load_config(path, overrides, {name: SECTIONS[name] for name in names}, valid_sections=SECTIONS)


def fields_help(section: str, cls) -> str:
    """The fields a class defines or re-defaults, with their help; inherited TRL fields are documented by TRL."""
    ours = set().union(*(vars(base).get("__annotations__", {}) for base in cls.__mro__
                         if base.__module__.split(".")[0] not in ("trl", "transformers")))
    own = [f for f in dataclasses.fields(cls) if f.name in ours]
    return "\n".join(f"  --{section}.{f.name} (default: {f.default!r})\n      {f.metadata.get('help', '')}"
                     + (" Not in the config hash." if f.metadata.get("hashed") is False else "")
                     + (" Not in round 1's config hash." if f.metadata.get("later_rounds") else "")
                     for f in own)


class StageHelp(argparse.Action):
    """`rlhf STAGE --help`: the usual help plus the stage's config fields (this imports the stage)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="show this help, with every config field, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from pipeline.stages import SECTIONS

        command = parser.prog.split()[-1]
        section = "preferences" if command in ("sample", "serve") else command
        parser.print_help()
        print(f"\nconfig fields (YAML keys under run: / {section}:, or --section.field value), with their built-in\n"
              f"defaults (a --config file's values override them: configs/default.yaml sets many):\n"
              f"{fields_help('run', SECTIONS['run'])}\n{fields_help(section, SECTIONS[section])}")
        if section in TRL_FIELDS_NOTE:
            print(f"  ... and every field of the TRL config it extends, e.g. {TRL_FIELDS_NOTE[section]}")
        parser.exit()


def build_parser(stages=()) -> argparse.ArgumentParser:
    """The whole command line; `stages` (pipeline.stages.STAGES) adds a command per stage and `rlhf run`."""
    parser = argparse.ArgumentParser(prog="rlhf", description="The RLHF pipeline: sft -> preferences -> reward -> "
                                                              "ppo/dpo -> eval. Run `rlhf COMMAND --help` for details.")
    commands = parser.add_subparsers(dest="command", required=True)

    models_parser = commands.add_parser("models", help="list or prepare bundled models")
    models_commands = models_parser.add_subparsers(dest="models_command", required=True)
    models_commands.add_parser("list", help="bundled models and whether they are prepared")
    prepare = models_commands.add_parser("prepare", help="build a bundled model's cached folder (once)")
    prepare.add_argument("name", help="a bundled model name (see `rlhf models list`)")
    models_parser.set_defaults(handler=run_models)

    label = commands.add_parser("label", help="preference collection: sample, serve, users, gold, simulate, ai, "
                                               "stats, export, close, reopen")
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
    sample.add_argument("--config", help="YAML run config (its preferences: section)")
    sample.add_argument("--select", choices=["all", "uncertain"],
                        help="queue every candidate pair, or those the reward model is least sure about")
    sample.add_argument("--reward-model", help="with --select uncertain: the reward model folder")
    sample.add_argument("--select-count", type=int, help="with --select uncertain: how many comparisons to queue")
    serve = label_commands.add_parser("serve", help="the labelling app in the browser (Gradio)", add_help=False)
    serve.add_argument("-h", "--help", action=StageHelp)
    serve.add_argument("--config", help="YAML run config (its preferences: section: overlap, gold_rate, guidelines, "
                                        "...)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--batch", help="hand out only this batch (gold items are always mixed in; default: every "
                                       "batch not yet exported)")
    serve.add_argument("--no-auth", action="store_true",
                       help="no sign-in, everyone acts as --user; only allowed on 127.0.0.1")
    serve.add_argument("--user", help="with --no-auth: the existing user everyone acts as")
    serve.add_argument("--ssl-keyfile", help="serve HTTPS with this key (passwords cross the network otherwise)")
    serve.add_argument("--ssl-certfile", help="... and this certificate")
    gold = label_commands.add_parser("gold", help="import comparisons with a known answer (attention checks)")
    gold.add_argument("file", help="JSONL/JSON/CSV/Parquet rows: id, prompt, a, b, expected (a|b|tie|both_bad)")
    gold.add_argument("--batch", default="gold", help="batch name for the gold items (default: gold)")
    simulate = label_commands.add_parser("simulate", help="simulated labellers take items from the queue and vote")
    simulate.add_argument("--judge", required=True,
                          help="builtin:length|keywords|readability|sentiment or module:function")
    simulate.add_argument("--labellers", type=int, default=3, help="how many simulated labellers (sim/<judge>/<i>)")
    simulate.add_argument("--batch", help="only this batch of comparisons (default: every batch not yet exported)")
    simulate.add_argument("--temperature", type=float, default=1.0,
                          help="Bradley-Terry temperature in judge-score units; 0 always picks the better one")
    simulate.add_argument("--tie-margin", type=float, default=0.0, help="score gaps below this are ties")
    simulate.add_argument("--both-bad-floor", type=float, help="both scores below this: both_bad")
    simulate.add_argument("--noise", type=float, default=0.0, help="chance of a uniformly random vote instead")
    simulate.add_argument("--skip", type=float, default=0.0, help="chance of skipping an item (another labeller "
                                                                     "gets its slot)")
    simulate.add_argument("--overlap", type=int, help="labellers each comparison goes to (default: all of them)")
    simulate.add_argument("--gold-rate", type=float, default=0.0, help="share of items drawn from gold comparisons")
    simulate.add_argument("--seed", type=int, default=0)
    ai = label_commands.add_parser("ai", help="an AI labeller: a local chat model votes by a written constitution")
    ai.add_argument("--model", default="smollm2-135m-instruct",
                    help="bundled model name or model folder (default: smollm2-135m-instruct); votes as ai/<name> "
                         "(a folder: its name and its content hash's first 8 hex digits)")
    ai.add_argument("--constitution", default="data/constitution.md", help="the principles it judges by")
    ai.add_argument("--batch", help="only this batch of comparisons (default: every batch not yet exported)")
    ai.add_argument("--tie-margin", type=float, default=0.05,
                    help="P(a better) within this of one half is a tie (both orders averaged)")
    ai.add_argument("--gold-rate", type=float, default=0.0, help="share of items drawn from gold comparisons")
    ai.add_argument("--overlap", type=int, default=3, help="labellers each comparison goes to, the AI one of them")
    stats = label_commands.add_parser("stats", help="progress, agreement and per-labeller throughput")
    stats.add_argument("--batch", help="only this batch of comparisons (default: every batch but the gold items)")
    export = label_commands.add_parser("export", help="votes -> a saved HF preference dataset (TRL format)")
    export.add_argument("--out", help="folder to write (refused if it holds a different export)")
    export.add_argument("--demonstrations", help="also (or only) write the labellers' written answers as SFT "
                                                 "demonstrations to this JSONL file")
    export.add_argument("--batch", help="only this batch of comparisons (default: all)")
    export.add_argument("--min-votes", type=int, default=1, help="leave out comparisons with fewer votes")
    close = label_commands.add_parser("close", help="stop serving a batch and taking answers on its items, until "
                                                    "`reopen` (a preferences stage on it exports the comparisons that "
                                                    "have their votes)")
    close.add_argument("batch", help="the batch's name (`rlhf label stats` lists them)")
    reopen = label_commands.add_parser("reopen", help="serve a closed batch again (a run reads its new votes when "
                                                      "`rlhf preferences` runs again)")
    reopen.add_argument("batch", help="the batch's name (`rlhf label stats` lists them)")
    for command in (add, users_commands.choices["list"], disable, enable, sample, serve, gold, simulate, ai, stats,
                    export, close, reopen):
        # --db is accepted after the subcommand too (`rlhf label serve --db URL`); SUPPRESS keeps an earlier one.
        command.add_argument("--db", default=argparse.SUPPRESS, help="database URL (as `rlhf label --db`)")
    for command in (add, users_commands.choices["list"], disable, enable, gold, simulate, ai, stats, export, close,
                    reopen):
        command.add_argument("--config", help="YAML run config: its run's label store (runs/NAME/labels.db, or its "
                                              "labels.db)")
    label.set_defaults(handler=run_label)

    if stages:
        add_stage_commands(commands, stages)
    return parser


def add_stage_commands(commands, stages) -> None:
    """`rlhf run`, and `rlhf STAGE` for each stage (with its actions, `rlhf STAGE ACTION`)."""
    names = ", ".join(stage.name for stage in stages)
    run = commands.add_parser("run", help=f"every stage in order: {names} (skips what is up to date, resumes what "
                                          "was cut short)")
    run.add_argument("--config", default="configs/default.yaml", help="YAML run config (default: %(default)s)")
    run.add_argument("--from", dest="start_from", help="rerun this stage (STAGE, or round-R/STAGE in a later "
                                                       "online round) and every one after it")
    run.add_argument("--launcher", choices=["python", "accelerate"], default="python",
                     help="how training stages start: one process, or `accelerate launch`")
    run.add_argument("--accelerate_config", help="with --launcher accelerate: configs/accelerate/*.yaml")
    run.set_defaults(handler=run_pipeline)
    for stage in stages:
        actions = "".join(f" `rlhf {stage.name} {action} --config ...` {what}."
                          for action, (_, what) in stage.actions.items())
        command = commands.add_parser(stage.name, help=stage.help, add_help=False,
                                      description=f"{stage.help}. Overrides: --section.field value.{actions}")
        command.add_argument("-h", "--help", action=StageHelp)
        command.add_argument("--config", help="YAML run config (configs/default.yaml, configs/tiny.yaml)")
        command.set_defaults(handler=run_stage, stage=stage)


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
    from rlhf.store import Store, check_batch_name, check_new_user, check_prompt_widths, shown_url

    if args.label_command in ("sample", "serve"):
        return run_label_with_config(args, rest)
    if rest:
        raise UserError(f"unexpected arguments: {' '.join(rest)}")
    gold = load_rows(args.file, "gold") if args.label_command == "gold" else None  # checked before the store opens
    if gold is not None:
        check_batch_name(args.batch, "--batch")
        check_prompt_widths([f"{args.batch}/{row['id']}" for row in gold], [row["category"] for row in gold],
                            args.file)
    if args.label_command == "export":
        check_export_options(args)
    labellers = simulated_labellers(args) if args.label_command == "simulate" else None
    if args.label_command == "ai":
        check_ai_labeller(args)
    adds_user = getattr(args, "users_command", None) == "add"
    password = read_password() if adds_user else None
    if adds_user:
        check_new_user(args.name, args.role, password)  # before a new store is made for it
    store = Store(label_store_url(args), create=args.label_command == "gold" or adds_user)
    if store.created:
        print(f"created the label store {shown_url(store.url)}")
    if args.label_command in ("simulate", "ai", "stats", "export", "close", "reopen"):
        store.check_batch(args.batch, to_label=args.label_command in ("simulate", "ai"))
    if args.label_command == "gold":
        from preference_ui.gold import import_gold

        summary = import_gold(store, args.file, args.batch, gold)
        print(f"batch '{summary['batch']}': {summary['items']} gold comparisons"
              f"{' (already imported)' if summary['unchanged'] else ''}")
    elif args.label_command == "simulate":
        from preference_ui.simulate import simulate

        counts = simulate(store, args.judge, args.labellers, labellers, args.batch, args.seed, args.overlap,
                          args.gold_rate)
        print(" ".join(f"{choice}={count}" for choice, count in counts.items()))
    elif args.label_command == "ai":
        from preference_ui.ai_labeller import ai_label

        counts = ai_label(store, args.model, args.constitution, args.batch, args.tie_margin, args.overlap,
                          args.gold_rate)
        print(" ".join(f"{choice}={count}" for choice, count in counts.items()))
    elif args.label_command == "stats":
        from preference_ui.stats import format_stats, stats

        print(format_stats(stats(store, args.batch)))
    elif args.label_command == "export":
        from rlhf.label_export import (check_demonstrations_file, check_output, demonstrations, export,
                                       write_demonstrations)

        for path, option, folder in ((args.out, "--out", True), (args.demonstrations, "--demonstrations", False)):
            if path:  # both checked before either is written
                check_output(Path(path), option, folder)
        written = demonstrations(store, args.batch) if args.demonstrations else None
        if written is not None:
            check_demonstrations_file(written, Path(args.demonstrations))
        if args.out:
            manifest = export(store, args.out, args.batch, args.min_votes)
            state = "unchanged" if manifest.get("unchanged") else "written"
            print(f"{args.out}: {manifest['rows']} pairs ({manifest['ties']} ties, {manifest['both_bad']} both bad), "
                  f"content hash {manifest['content_hash']}, {state}")
        if args.demonstrations:
            write_demonstrations(written, args.demonstrations)
            print(f"{args.demonstrations}: {len(written)} demonstrations written by labellers")
    elif args.label_command in ("close", "reopen"):
        print(close_or_reopen(store, args.batch, args.label_command == "close"))
    elif args.users_command == "add":
        store.add_user(args.name, args.role, password)
        print(f"added {args.role} {args.name}")
    elif args.users_command in ("disable", "enable"):
        store.set_disabled(args.name, args.users_command == "disable")
        print(f"{args.users_command}d {args.name}")
    else:
        for user in store.users():
            print(f"{user.name:24} {user.role:9} {'disabled' if user.disabled else 'active'}")
    return 0


def close_or_reopen(store, batch: str, close: bool) -> str:
    """Closes or reopens `batch` (the same as it was: said, nothing written); returns what was done."""
    from rlhf.store import shown_utc

    if "gold" in store.batch_kinds(batch):
        raise UserError(f"batch '{batch}' holds gold items, which are mixed into every batch: it is never closed")
    closed = store.closing(batch)
    if close and closed is not None and closed.by_hand:
        return f"batch '{batch}' was already closed by hand (at {shown_utc(closed.closed_at)})"
    if close and closed is not None:
        store.close_batch(batch, by_hand=True)
        return (f"batch '{batch}' was closed by its export at {shown_utc(closed.closed_at)}: now closed by hand, so "
                "that a preferences stage run again keeps it closed (until `rlhf label reopen`)")
    if not close and closed is None:
        return f"batch '{batch}' is open already"
    if close:
        store.close_batch(batch, by_hand=True)
        return (f"closed batch '{batch}': none of its items is served and no answer on them is taken (a preferences "
                "stage on it exports the comparisons that have their votes, until `rlhf label reopen`)")
    store.reopen_batch(batch)
    return (f"reopened batch '{batch}' (closed at {shown_utc(closed.closed_at)}): its items are served again; a run "
            "reads the new votes when `rlhf preferences --config ...` runs again (`rlhf run` counts the stage up to "
            "date)")


def simulated_labellers(args):
    """How `label simulate`'s labellers vote, every flag and the judge checked before the store opens."""
    from preference_ui.simulate import LabellerModel, voting_judge

    voting_judge(args.judge)  # a judge that cannot vote is refused
    if args.labellers < 1 or (args.overlap is not None and args.overlap < 1) or not 0 <= args.gold_rate <= 1:
        raise UserError(f"--labellers and --overlap must be at least 1 and --gold-rate between 0 and 1, got "
                        f"{args.labellers}, {args.overlap} and {args.gold_rate}")
    try:
        return LabellerModel(args.temperature, args.tie_margin, args.both_bad_floor, args.noise, args.skip)
    except ValueError as err:
        raise UserError(str(err)) from None


def check_ai_labeller(args) -> None:
    """The AI labeller's constitution and model exist, and its tie margin is a probability gap: checked before the
    store opens."""
    from preference_ui.ai_labeller import check_ai_inputs

    if not 0 <= args.tie_margin < 0.5:
        raise UserError(f"--tie-margin is a gap in probability from one half: 0 to below 0.5, got {args.tie_margin}")
    if args.overlap < 1 or not 0 <= args.gold_rate <= 1:
        raise UserError(f"--overlap must be at least 1 and --gold-rate between 0 and 1, got {args.overlap} and "
                        f"{args.gold_rate}")
    check_ai_inputs(args.model, args.constitution)


def label_store_url(args) -> str:
    """--db; else with --config the run's label store; else $RLHF_DB_URL or sqlite:///runs/labels.db."""
    from rlhf.store import database_url, run_store_url

    if args.db is not None and not args.db.strip():  # ($DB unset in a script): not the default store, unsaid
        raise UserError("--db is empty: give the label store's URL, or leave --db out for the default store")
    if args.db or not getattr(args, "config", None):
        return database_url(args.db)
    sections = read_sections(args.config, [], ["run", "preferences"])
    return run_store_url(sections["run"].output_root, sections["run"].name, sections["preferences"].db or None)


def run_label_with_config(args, rest) -> int:
    """`label sample` and `serve` read the preferences: section of a run config, with overrides; with a --config,
    the run's label store unless --db (or the section's db) names another."""
    from rlhf.store import Store, run_store_url

    if args.label_command == "sample":  # the short flags are the preferences: fields of the same name
        rest = rest + [item for flag, value in (("select", args.select), ("reward_model", args.reward_model),
                                                ("select_count", args.select_count)) if value is not None
                       for item in (f"--preferences.{flag}", str(value))]
    sections = read_sections(args.config, rest, ["run", "preferences"])
    config, run = sections["preferences"], sections["run"]
    config.db = args.db or config.db
    if args.config:
        config.db = run_store_url(run.output_root, run.name, config.db or None)
    if args.label_command == "sample":
        from preference_ui.collect import batch_keys, inputs
        from preference_ui.sample import main as sample
        from rlhf.runs import input_hashes

        # the key `rlhf run` checks when it finds this batch (made for people: no machine labellers' key)
        drawn_from = batch_keys(config, run, input_hashes(inputs(config, run)))["drawn_from"]
        sample(config, run, keys={"drawn_from": drawn_from})
        return 0
    from preference_ui.app import check_host, serve

    check_host(args.host, auth=not args.no_auth)
    store = Store(config.db or None, create=False)
    store.check_batch(args.batch, to_label=True)  # a mistyped batch would hand out only gold items, using them up
    serve(store, config, args.host, args.port, auth=not args.no_auth,
          local_user=args.user, batch=args.batch, ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
          export_root=Path(run.output_root) / "exports")
    return 0


def check_export_options(args) -> None:
    if not (args.out or args.demonstrations):
        raise UserError("rlhf label export needs --out (the preference dataset), --demonstrations (a JSONL file of "
                        "written answers), or both")
    if args.min_votes < 1:
        raise UserError(f"--min-votes must be at least 1, got {args.min_votes}")
    if args.out and args.demonstrations and Path(args.out).resolve() in (Path(args.demonstrations).resolve(),
                                                                         *Path(args.demonstrations).resolve().parents):
        raise UserError(f"--demonstrations {args.demonstrations} is in --out {args.out}, the export's own folder: "
                        "write it elsewhere")


def read_password() -> str:
    """From the terminal without echo, or the first line of stdin when it is not a terminal (scripts, CI)."""
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise UserError("the passwords differ")
        return password
    return sys.stdin.readline().rstrip("\r\n")  # a Windows line end's \r is not part of the password


def run_stage(args, rest) -> int:
    from rlhf.stage import run_stage as run_one

    stage = args.stage
    if rest and not rest[0].startswith("-"):
        if rest[0] not in stage.actions:
            raise UserError(f"rlhf {stage.name}: unknown action '{rest[0]}'"
                            + (f" (actions: {', '.join(stage.actions)})" if stage.actions else ""))
        action = stage.actions[rest[0]][0]
        sections = read_sections(args.config, rest[1:], ["run", stage.name])
        action(sections[stage.name], sections["run"])
    else:
        sections = read_sections(args.config, rest, ["run", stage.name])
        run_one(stage, sections[stage.name], sections["run"])
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


def not_the_tied_head_warning(record: logging.LogRecord) -> bool:
    """accelerate warns at every checkpoint that a tied LM head is saved once ("Removed shared tensor"): loading
    ties it again, as the resume tests check."""
    return "Removed shared tensor" not in record.getMessage()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    # accelerate logs each file of a checkpoint (seven lines for PPO's); the stages print one line of their own
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "torch", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("accelerate.utils.other").addFilter(not_the_tied_head_warning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def die_with_parent() -> None:
    """In the child: SIGKILL when the parent dies, so a killed `rlhf run` leaves no stage running on (Linux). A
    stage under `accelerate launch` is the launcher's child: it asks for the same itself (`main`, before its slow
    imports), so the kill passes down the chain (the setting is not inherited across fork)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get(STAGE_OF_A_RUN):  # started by rlhf run, perhaps through a launcher: die with it
        die_with_parent()
    if os.getcwd() not in sys.path:  # `module:function` judges are found from the working folder, as with python -m
        sys.path.insert(0, os.getcwd())
    if argv and argv[0] in LIGHT_COMMANDS:
        parser = build_parser()
    else:
        from pipeline.stages import STAGES

        parser = build_parser(STAGES)
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
        print(f"error: {err.filename}: {err.strerror}" if err.filename else f"error: {err.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
