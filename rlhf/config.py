"""One YAML file per run, one section per stage, each section mapped onto that stage's dataclass.

    run:                     # RunConfig below
      name: demo
    sft:                     # sft.config.SFTStageConfig (a trl.SFTConfig)
      model: smollm2-135m-instruct
      learning_rate: 2.0e-5

Every field is a YAML key and a command-line override, `--section.field value` (or `--section.field=value`).
Values are converted to the field's type, so `--sft.learning_rate 2e-5` and YAML's `2e-5` (a string to YAML)
both become floats. An unknown key is an error that names the close matches and lists the valid keys.
Relative paths in a config are relative to the directory the command runs in.
"""
import collections.abc
import dataclasses
import difflib
import enum
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from rlhf.errors import ConfigError
from rlhf.runs import RunDir, check_run_name

RENAMED_SECTIONS = {"labels": "preferences"}
ROUND_SECTION = re.compile(r"round-[1-9][0-9]*")  # round-2, not round-02 (which no round would read)
TRACKERS = ("wandb", "trackio", "none")


def check_project_name(project: str) -> None:
    """What wandb takes as a project (and trackio as its database's name): checked before a stage writes anything,
    not found by wandb after the first stage has started."""
    if not project.strip() or len(project) > 128 or any(char in project for char in "/\\#?%:"):
        raise ValueError(f"project must be 1 to 128 characters, none of / \\ # ? % :, got '{project}'")


@dataclass
class RunConfig:
    """Settings every stage of a run shares."""

    name: str = field(default="default", metadata={
        "help": "Run name: outputs go to <output_root>/<name>/ (letters, digits, '.', '_', '-'; at most 100)."})
    output_root: str = field(default="runs", metadata={"help": "Folder that holds all runs."})
    tracking: str = field(default="wandb,trackio", metadata={
        "help": "Comma-separated trackers: wandb (offline unless logged in), trackio (local dashboard), or none."})
    project: str = field(default="rlhf", metadata={
        "help": "wandb and trackio project name (at most 128 characters, none of / \\ # ? % :)."})
    sample_every: int = field(default=0, metadata={
        "help": "SFT: log a table of sample prompts and responses every N steps (0: only before and after); "
                "PPO's tables follow ppo.sample_every."})
    rounds: int = field(default=1, metadata={
        "help": "Online rounds `rlhf run` makes: round 1 is the chain; each later round samples the latest "
                "policy's answers on fresh prompts, labels those the reward model is least sure of, retrains the "
                "reward model on all votes so far and continues PPO and DPO (docs/online_rounds.md)."})
    round: int = field(default=1, metadata={
        "help": "The online round a stage command works in (`rlhf run` sets it): round r > 1 reads and writes "
                "runs/<name>/round-<r>/ and the `round-<r>:` section of the config."})

    def __post_init__(self):
        check_run_name(self.name)
        check_project_name(self.project)
        if self.rounds < 1 or self.round < 1:
            raise ValueError(f"rounds and round must be at least 1, got {self.rounds} and {self.round}")
        self.trackers = parse_trackers(self.tracking)

    def directory(self) -> RunDir:
        """The run's folder, seen from this round."""
        return RunDir(self.output_root, self.name, self.round)


def parse_trackers(text: str) -> list[str]:
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown or not names:
        raise ValueError(f"tracking: unknown tracker(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(TRACKERS)}")
    return [] if names == ["none"] else [name for name in names if name != "none"]


def load_config(path, overrides: list[str], sections: dict[str, type], valid_sections=None) -> dict[str, object]:
    """Builds one dataclass instance per entry of `sections` from the YAML at `path` plus CLI overrides.
    Sections of other stages in the file are left alone (they are checked when their stage runs); with
    `valid_sections` (the `rlhf` command passes pipeline.stages.SECTIONS) any other section name is an error."""
    document = read_yaml(path, valid_sections) if path else {}
    from_command_line = parse_overrides(overrides, sections)
    built = {}
    if "run" in sections:
        built["run"] = build_section(*section_values(document, from_command_line, "run", path, None),
                                     sections["run"])
    round_section = f"round-{built['run'].round}" if "run" in built else None
    for name, cls in sections.items():
        if name != "run":
            built[name] = build_section(*section_values(document, from_command_line, name, path, round_section),
                                        cls)
    return built


def section_values(document: dict, from_command_line: dict, name: str, path, round_section: str | None):
    """(where each key came from, section name, values): the file's section, then the round's own settings for it
    (a `round-<r>:` section), then the command line."""
    in_round = ((document.get(round_section) or {}).get(name) or {}) if round_section else {}
    values = {**(document.get(name) or {}), **in_round, **from_command_line.get(name, {})}
    where = {key: "command line" if key in from_command_line.get(name, {}) else
             f"{path} ({round_section})" if key in in_round else str(path) for key in values}
    return where, name, values


class ConfigLoader(yaml.SafeLoader):
    """YAML as safe_load reads it, except that only plain decimals are integers: YAML 1.1 reads 0612 as the octal
    394, 0x1F and 1:30 (base 60) as numbers too, so a run named 0612 would write to runs/394. Such text stays text
    (an integer setting still reads "0612" as 612)."""


def unique_keys(loader: ConfigLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are each given once: YAML keeps the last of two `sft:` sections, or of two `lr:` keys,
    and the first one's settings vanished unsaid."""
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, merged as YAML does
            continue
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, collections.abc.Hashable):
            continue  # refused as YAML does, below
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"'{key}' is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, unique_keys)
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"),
                                   list("-+0123456789"))


def read_yaml(path, valid_sections=None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), ConfigLoader) or {}
    except yaml.MarkedYAMLError as err:  # one line: where, and what
        where = f"{path}:{err.problem_mark.line + 1}" if err.problem_mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: " + "; ".join(filter(None, (err.context, err.problem)))) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at byte {err.start})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got a {type(document).__name__}")
    for name, values in document.items():
        if ROUND_SECTION.fullmatch(str(name)) and valid_sections is not None:
            check_round_section(path, name, values, valid_sections)
            continue
        if name in RENAMED_SECTIONS and valid_sections is not None:
            raise ConfigError(f"{path}: section '{name}' is now called '{RENAMED_SECTIONS[name]}'")
        if valid_sections is not None and name not in valid_sections:
            raise ConfigError(f"{path}: unknown section '{name}'{suggest(name, list(valid_sections))}; "
                              f"valid sections: {', '.join(valid_sections)} (and round-2, round-3, ...)")
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{path}: section '{name}' must be a mapping of keys to values")
    return document


def check_round_section(path, name: str, values, valid_sections) -> None:
    """`round-<r>:` holds stage sections whose settings apply in online round r only (r >= 2)."""
    if int(name.split("-")[1]) < 2:
        raise ConfigError(f"{path}: section '{name}': round sections start at round-2 (round 1 is the file's own "
                          "sections)")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: section '{name}' must be a mapping of stage sections")
    stages = [section for section in valid_sections if section not in ("run", "sft")]  # SFT runs once, in round 1
    for section, settings in values.items():
        if section not in stages:
            raise ConfigError(f"{path}: {name}.{section}: not a stage of online rounds{suggest(section, stages)}; a "
                              f"round section holds {', '.join(stages)} (sft runs once, in round 1)")
        if settings is not None and not isinstance(settings, dict):
            raise ConfigError(f"{path}: {name}.{section} must be a mapping of keys to values")


def parse_overrides(tokens: list[str], sections: dict[str, type]) -> dict[str, dict]:
    """["--sft.learning_rate", "2e-5", "--run.name=x"] -> {"sft": {"learning_rate": "2e-5"}, "run": {"name": "x"}}"""
    values: dict[str, dict] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or "." not in token:
            raise ConfigError(f"unexpected argument '{token}': overrides look like --section.field value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or (tokens[i + 1].startswith("--") and "." in tokens[i + 1]):
                raise ConfigError(f"--{key}: missing value")
            value, i = tokens[i + 1], i + 1
        section, _, name = key.partition(".")
        if section not in sections:
            raise ConfigError(f"--{key}: this command takes only {', '.join('--' + s + '.*' for s in sections)}")
        values.setdefault(section, {})[name] = value
        i += 1
    return values


def field_types(cls) -> dict[str, object]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references in a third-party class: fall back to raw annotations
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls) if f.init}


# TRL settings every training stage sets for itself: given in a stage's section, they were ignored
SET_BY_THE_PIPELINE = {"output_dir": "run.output_root (checkpoints go to runs/<name>/.<stage>.partial/)",
                       "report_to": "run.tracking"}


def build_section(where: dict[str, str], section: str, values: dict, cls):
    """`where` names, for each key, the file or "command line" it came from, for the error message."""
    types_by_name = field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_by_name:
            raise ConfigError(f"{where[key]}: {section}.{key}: unknown key{suggest(key, types_by_name)}; "
                              f"valid keys for '{section}': {', '.join(sorted(types_by_name))}")
        if key in SET_BY_THE_PIPELINE and section != "run":
            raise ConfigError(f"{where[key]}: {section}.{key}: set by the pipeline itself (it would be ignored); "
                              f"use {SET_BY_THE_PIPELINE[key]}")
        try:
            kwargs[key] = coerce(value, types_by_name[key])
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where[key]}: {section}.{key}: {err}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, OSError) as err:  # OSError: a file a setting names (accelerator_config)
        files = sorted(set(where.values()) - {"command line"})
        overridden = "command line" in where.values()
        source = (files[0] + (" with command-line overrides" if overridden else "")) if files else \
            ("command line" if overridden else "defaults")
        raise ConfigError(f"{source}: {section}: {err}") from None


def suggest(name, valid) -> str:
    close = difflib.get_close_matches(str(name), [str(option) for option in valid], n=3)  # YAML keys may be numbers
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def coerce(value, annotation):
    """Converts a YAML or command-line value to a field's declared type; raises ValueError when it cannot."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return coerce_union(value, args)
    if annotation is typing.Any or annotation is object:
        return yaml_value(value) if isinstance(value, str) else value
    if annotation is bool:
        return coerce_bool(value)
    if annotation in (int, float):
        return coerce_number(value, annotation)
    if annotation is str or (isinstance(annotation, type) and issubclass(annotation, enum.Enum)):
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        if value is None:  # a YAML key left empty: not the text "None"
            raise ValueError("expected a string, got nothing (an empty or null value; write '' for none)")
        if isinstance(value, bool):  # YAML reads yes, no, on and off as booleans
            raise ValueError(f"expected a string, got {str(value).lower()} (YAML reads yes/no/on/off as true/false: "
                             "quote it)")
        return value if isinstance(value, (str, enum.Enum)) else str(value)
    if origin in (list, tuple) or annotation in (list, tuple):
        return coerce_list(value, args)
    if origin is dict or annotation is dict:
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:  # YAML's {key: value} (which reads 1e-6 as text: JSON first)
                value = yaml_value(value)
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {type(value).__name__}")
        return {key: exponent_number(item) for key, item in value.items()}
    return value


EXPONENT = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+")


def exponent_number(value):
    """A mapping's value as TRL reads it: YAML 1.1 takes 1e-6 (no dot) for text, and `lr_scheduler_kwargs:
    {min_lr: 1e-6}` crashed the scheduler mid-stage; a typed field reads such text as a number already."""
    return float(value) if isinstance(value, str) and EXPONENT.fullmatch(value.strip()) else value


def coerce_union(value, args):
    if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if bool in args and (isinstance(value, bool) or isinstance(value, str) and value.lower() in ("true", "false")):
        return coerce_bool(value)  # `str | bool`: "false" is false, not the text
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return coerce(value, arg)
        except (TypeError, ValueError) as err:
            errors.append(str(err))
    raise ValueError("; ".join(dict.fromkeys(errors)))


def coerce_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.lower() in ("true", "yes", "1", "on")
    raise ValueError(f"expected true or false, got {value!r}")


def coerce_number(value, kind):
    if isinstance(value, bool):
        raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    try:
        number = float(value) if isinstance(value, str) else value
        if kind is int:
            if not float(number).is_integer():
                raise ValueError
            return int(number)
        if not math.isfinite(float(number)):  # nan passed every range check (nan < 0 is false) and inf most
            raise ValueError
        return float(number)
    except (TypeError, ValueError):
        raise ValueError(f"expected {'an integer' if kind is int else 'a finite number'}, got {value!r}") from None


def yaml_value(text: str):
    try:
        return yaml.load(text, ConfigLoader)
    except yaml.YAMLError as problem:
        raise ValueError(f"not a YAML value ({' '.join(str(problem).split())}): {text!r}") from None


def coerce_list(value, args):
    if isinstance(value, str):
        value = yaml_value(value) if value.strip().startswith("[") else comma_list(value)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list, got {type(value).__name__}")
    return [coerce(item, args[0]) if args else item for item in value]


def comma_list(text: str) -> list[str]:
    """`a,b` as [a, b]; an empty text as no items (not one empty item); an empty item between commas refused."""
    if not text.strip():
        return []
    items = [item.strip() for item in text.split(",")]
    if "" in items:
        raise ValueError(f"an empty item in the comma-separated list {text!r}")
    return items


def as_plain_dict(config) -> dict:
    """A config as JSON-friendly values, for hashing, the manifest and tracking: a password in a URL (a label
    store's) hidden, so it is neither written down nor part of the config hash (a new password reruns nothing)."""
    plain = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    return {key: password_hidden(value) for key, value in json.loads(json.dumps(plain, default=str)).items()}


def password_hidden(value):
    """A URL's password as ***; any other value as it is."""
    if not isinstance(value, str) or "://" not in value:
        return value
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return value
    if not password:
        return value
    return parts._replace(netloc=parts.netloc.replace(f":{password}@", ":***@", 1)).geturl()


def hashed_settings(config, round: int = 1) -> dict:
    """The settings a stage's config hash covers: those that change its outputs. Left out: `resume` (how the stage
    gets to its result, not the result), fields marked `metadata={"hashed": False}` (what only the stage's own
    evaluation reads, which `rlhf reward eval` redoes in its own folder; what only the labelling app reads), and in
    round 1 the fields marked `metadata={"later_rounds": True}` (read by online rounds 2 and later only: changing
    them leaves round 1 done)."""
    skipped = {"resume"} | {f.name for f in dataclasses.fields(config) if f.metadata.get("hashed") is False
                            or (round == 1 and f.metadata.get("later_rounds"))}
    return {key: value for key, value in as_plain_dict(config).items() if key not in skipped}


@dataclass
class TrainingStageDefaults:
    """Fields every training stage adds to its TRL config, and the TRL defaults we change for all of them
    (listed first in a stage config's bases, so these defaults win over TRL's)."""
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 on GPUs and CPUs that support it natively, else fp32), fp32, bf16 or fp16. "
                "Sets bf16/fp16 unless those are given explicitly."})
    resume: bool = field(default=False, metadata={
        "help": "Continue from the last checkpoint of an interrupted run of this stage."})
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "Recompute activations to save memory (~1/3 more compute). Unset: on only if memory needs it."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N optimizer steps."})
    save_strategy: str = field(default="steps", metadata={"help": "When to checkpoint: steps, epoch or no."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(default=1, metadata={"help": "Checkpoints kept while training."})
    eval_strategy: str = field(default="no", metadata={
        "help": "Extra evaluations during training (the stage measures its held-out figure before and after "
                "anyway)."})
