"""`rlhf preferences`: the preference stage of `rlhf run`, from candidates to a label export.

    rlhf preferences --config configs/default.yaml [--preferences.simulate_judge builtin:length ...]

1. sample the run's comparisons into the store (batch `preferences.batch`, default the run name), unless the batch
   already holds them;
2. import the gold comparisons, when `preferences.gold` names a file;
3. votes: an AI labeller (`preferences.ai_judge`), when set, first takes one of each comparison's places; then
   simulated labellers (`preferences.simulate_judge`) take items from the labelling queue and vote, as people
   do in the app (overlap, gold items, skips); or the stage waits, showing progress, until every comparison has
   `preferences.min_votes` votes from people in the app (or an admin closes the batch, `rlhf label close`: the
   comparisons that have them are exported);
4. export the batch's votes to `runs/<name>/preferences` (TRL's preference format), which the reward and DPO
   stages read, and close the batch: the app serves none of its items and takes no more answers on them (the
   overlap places left over would come before a later round's items, their votes never exported). A stage that
   collects the batch again reopens it first.

Each step picks up where a killed one stopped: sampled comparisons are stored in one transaction, simulated votes
are drawn per labeller and comparison and the queue hands out only what is left, and votes stay in the store. Without
`preferences.db` (or $RLHF_DB_URL) the run keeps its own store, `runs/<name>/labels.db`.
"""
import dataclasses
import os
import time

from preference_ui import sample
from preference_ui.ai_labeller import ai_label, ai_model_input, check_ai_inputs
from preference_ui.config import PreferencesStageConfig
from preference_ui.gold import check_gold, import_gold
from preference_ui.simulate import LabellerModel, simulate, voting_judge
from preference_ui.stats import stats
from rlhf.config import RunConfig
from rlhf.datasets import first_rows, load_rows
from rlhf.errors import ConfigError, DataError, UserError
from rlhf.judges import check_judge_settings, judge_sources
from rlhf.label_export import export
from rlhf.runs import hash_config, read_stage_record
from rlhf.stage import Inputs, Outcome, Stage, earlier_round_model, round_seed, run_stage, start_partial
from rlhf.store import (NoStoreYet, Store, check_batch_name, check_database_url, check_prompt_widths, run_store_url,
                        shown_url, shown_utc)

STAGE = "preferences"


def main(config: PreferencesStageConfig, run: RunConfig) -> dict:
    return run_stage(PREFERENCES_STAGE, config, run)


def inputs(config: PreferencesStageConfig, run: RunConfig) -> dict:
    """Round 1: the model that answers (the SFT model). A later online round: the previous round's policy, and
    its reward model to pick the pairs it is least sure about. Then the prompts, the AI labeller's constitution and
    model folder, the gold file, and the label store when it is not the run's own (its URL, password hidden)."""
    found = Inputs()
    if run.round == 1:
        found.add("model", lambda: sample.model_spec(config, run))
    else:
        run_dir = run.directory()
        found.add("model", lambda: earlier_round_model(run_dir, config.round_policy, f"{config.round_policy} policy"))
        found.add("reward_model", lambda: earlier_round_model(run_dir, "reward", "reward model"))
    found.add("prompts", config.prompts)
    found.add("judges", judge_sources(simulate_judge=config.simulate_judge))
    if config.ai_judge:
        found.add("ai_constitution", config.ai_constitution)
        if folder := ai_model_input(config.ai_judge):
            found.add("ai_judge", folder)
    if config.gold:
        found.add("gold", config.gold)
    if config.db or os.environ.get("RLHF_DB_URL"):  # the run's own store goes with its folder: not recorded
        found.add("store", shown_url(config.db or os.environ["RLHF_DB_URL"]))
    return found.found()


def check(config: PreferencesStageConfig, run: RunConfig, found: dict) -> tuple[list, list | None, int]:
    """(the round's prompts, the gold rows, how many of the file's prompts the rounds so far have taken), read and
    checked, and the simulated labellers' judge loaded: all
    before the stage creates anything, the store among them."""
    check_feedback(config, run)
    check_database_url(run_store_url(run.output_root, run.name, config.db or None))
    check_batch_name(config.batch or run.name, rounds=run.rounds)
    taken = prompts_taken_before(run, config)
    rows, gold = files(config, run)
    check_gold_in_store(config, run, gold)
    prompts = round_prompts(rows, config, run.round, taken)
    check_prompt_widths([row["id"] for row in prompts], [row["category"] for row in prompts], config.prompts)
    return prompts, gold, taken + len(prompts)


def files(config: PreferencesStageConfig, run: RunConfig) -> tuple[list[dict], list[dict] | None]:
    """(every prompt of the file, the gold rows), read and checked row by row; the simulated labellers' judge
    loaded, the AI labeller's constitution and model found."""
    check_judge_settings({"preferences.simulate_judge": config.simulate_judge})
    rows = load_rows(config.prompts, "prompt")
    gold = load_rows(config.gold, "gold") if config.gold else None
    if config.simulate_judge:
        voting_judge(config.simulate_judge)
    if config.ai_judge:
        check_ai_inputs(config.ai_judge, config.ai_constitution)
    return rows, gold


GOLD_FIX = ("the gold items are the store's own, shared by every run labelling in it: point preferences.gold at the "
            "file they came from, or label in another store (preferences.db)")


def check_gold_in_store(config: PreferencesStageConfig, run: RunConfig, gold: list[dict] | None) -> None:
    """The store's gold items, where it has some, are this gold file's, and the file's prompt ids name no other
    text there: checked (reading only) before anything is sampled."""
    if gold is None:
        return
    try:
        store = Store(run_store_url(run.output_root, run.name, config.db or None), create=False)
    except NoStoreYet:
        return
    check_gold(store, config.gold, gold, fix=GOLD_FIX)


def check_feedback(config: PreferencesStageConfig, run: RunConfig) -> None:
    """Ranking items are collected in one round, so far."""
    if config.feedback == "ranking" and run.rounds > 1:
        raise ConfigError(f"preferences.feedback ranking runs one round (run.rounds is {run.rounds}): later rounds "
                          "queue the pairs the reward model is least sure of, and rankings have no such choice yet")


def prompts_taken_before(run: RunConfig, config: PreferencesStageConfig) -> int:
    """How many of the file's prompts the rounds before this one took, as the previous round's stage recorded it
    (a round's settings may differ from the next one's). Without that record (a run from before it was kept, or
    that round not run): num_prompts and this round's round_prompts for each round between."""
    if run.round == 1:
        return 0
    previous = read_stage_record(run.directory().in_round(run.round - 1).stage_path(STAGE))
    if "prompts_taken" in previous:
        return previous["prompts_taken"]
    return config.num_prompts + (run.round - 2) * (config.round_prompts or config.num_prompts)


def round_prompts(rows: list[dict], config: PreferencesStageConfig, round: int, taken: int = 0) -> list[dict]:
    """Round 1 takes the first num_prompts prompts (all when 0); each later round the next round_prompts (default
    num_prompts) after the `taken` that earlier rounds took, so every round's answers are to prompts no earlier
    round saw."""
    if round == 1:
        return first_rows(rows, config.num_prompts, config.prompts, "preferences.num_prompts")
    if not config.num_prompts:
        raise ConfigError(f"preferences.num_prompts is 0: round 1 takes every prompt of {config.prompts} and leaves "
                          f"none fresh for round {round}; set num_prompts (and round_prompts)")
    per_round = config.round_prompts or config.num_prompts
    if len(rows) < taken + per_round:
        raise DataError(config.prompts, None, "rows", f"round {round} takes prompts {taken + 1}-{taken + per_round} "
                        f"({per_round} fresh prompts after the {taken} earlier rounds took), but the file has "
                        f"{len(rows)}; lower preferences.round_prompts or run.rounds, or add prompts")
    return rows[taken:taken + per_round]


def check_every_rounds_prompts(configs: list[PreferencesStageConfig]) -> None:
    """Each round of a run of several (its preferences settings in `configs`, round 1 first) finds its fresh
    prompts in the file: checked before round 1 starts, as each round counts them when it comes (a file used up
    by round 4 stopped the run after three rounds of training)."""
    taken, files = 0, {}
    for round, config in enumerate(configs, start=1):
        if config.prompts not in files:  # (the same file for every round, as a rule: read once)
            files[config.prompts] = load_rows(config.prompts, "prompt")
        taken += len(round_prompts(files[config.prompts], config, round, taken))


SAMPLING_SETTINGS = ("num_prompts", "round_prompts", "responses_per_prompt", "max_new_tokens", "temperature",
                     "round_budget", "seed", "precision")
ROUND_1_SAMPLING_SETTINGS = tuple(name for name in SAMPLING_SETTINGS if not name.startswith("round_"))
# what else round 1's batch is made of, with the defaults: in its key only where set otherwise, so that a batch keyed
# before they counted keeps its key (later rounds set them themselves, from inputs their key has)
ROUND_1_CHOICES = {"feedback": "pairwise", "select": "all", "select_count": 0, "reward_model": ""}
# who votes when machines do: a batch their votes filled (overlap places each) leaves no place to the votes of
# labellers with other settings, so a rerun under other settings would export the old votes as new
MACHINE_LABELLING_SETTINGS = ("simulate_judge", "simulate_labellers", "simulate_temperature", "simulate_noise",
                              "simulate_skip", "ai_judge", "ai_constitution", "ai_tie_margin", "overlap", "gold_rate")


def sampled_from(hashes: dict) -> dict:
    """The hashes of the inputs the answers are drawn from (not the gold file or the store they go to)."""
    return {name: value for name, value in hashes.items() if name in ("model", "reward_model", "prompts")}


def round_settings(config: PreferencesStageConfig, run: RunConfig, found: dict,
                   hashes: dict) -> PreferencesStageConfig:
    """How the stage samples in this round: round 1 as configured; a later round answers with the previous round's
    policy, keeps the round_budget pairs its reward model is least sure of, draws with the round's seed and
    stores them in a batch of its own, `<batch>-round-<r>-<key>` (what the app serves and the round's export
    holds). The key stands for what the comparisons are drawn from (the policy, the reward model and the prompts,
    by their content `hashes`, and the sampling settings): a rerun after a kill finds its batch and the votes
    already cast, and a round whose policy or sampling changed draws a new batch rather than reusing answers of
    another policy."""
    if run.round == 1:
        return config
    drawn_from = {"inputs": sampled_from(hashes), **{name: getattr(config, name) for name in SAMPLING_SETTINGS}}
    batch = f"{config.batch or run.name}-round-{run.round}-{hash_config(drawn_from)[:8]}"
    return dataclasses.replace(config, model=found["model"], select="uncertain", reward_model=found["reward_model"],
                               select_count=config.round_budget, seed=round_seed(config.seed, run.round),
                               num_prompts=0, batch=batch)


def collect(config: PreferencesStageConfig, run: RunConfig, found: dict, checked: tuple, tracker, record) -> Outcome:
    prompts, gold, prompts_taken = checked
    started = time.time()
    config = round_settings(config, run, found, record.input_hashes)  # the inputs' hashes, as recorded
    url = run_store_url(run.output_root, run.name, config.db or None)
    store, batch = Store(url), config.batch or run.name
    keys = batch_keys(config, run, record.input_hashes)
    if store.comparisons(batch):
        check_same_draw(store, batch, keys, older_labelled_by(config, run, record.input_hashes), run.round)
        print(f"[{STAGE}] batch '{batch}' already sampled: {len(store.comparisons(batch))} comparisons")
    else:
        sample.main(dataclasses.replace(config, db=url), run, prompts, keys=keys)
    if config.gold:
        import_gold(store, config.gold, rows=gold, fix=GOLD_FIX)
    closed = store.closing(batch)
    by_hand = closed is not None and closed.by_hand
    if by_hand:  # an admin's decision: no more votes on it, whoever the labellers
        print(f"[{STAGE}] batch '{batch}' was closed by hand: exporting the comparisons that have {config.min_votes} "
              f"vote(s) (`rlhf label reopen {batch}` to collect more)", flush=True)
    elif closed is not None and (config.ai_judge or config.simulate_judge
                                 or not has_votes(store, batch, config.min_votes)):
        # exported by an earlier attempt and collected again (min_votes raised, say)
        print(f"[{STAGE}] batch '{batch}' was exported and closed at {shown_utc(closed.closed_at)}: reopening it to "
              "collect its votes", flush=True)
        store.reopen_batch(batch)
    if config.ai_judge and not by_hand:
        counts = ai_label(store, config.ai_judge, config.ai_constitution, batch, config.ai_tie_margin,
                          config.overlap, config.gold_rate, config.seed)
        print(f"[{STAGE}] AI labeller votes ({config.ai_judge}): {counts}")
    if config.simulate_judge and not by_hand:
        model = LabellerModel(config.simulate_temperature, 0.0, None, config.simulate_noise, config.simulate_skip)
        counts = simulate(store, config.simulate_judge, config.simulate_labellers, model, batch, config.seed,
                          config.overlap, config.gold_rate)
        print(f"[{STAGE}] simulated votes ({config.simulate_judge}): {counts}")
    if not config.simulate_judge or batch in store.closed_by_hand():  # (closed by hand while they voted, too)
        wait_for_votes(store, batch, config)
    partial = run.directory().partial_path(STAGE)
    start_partial(STAGE, partial, resume=False, record=record)
    # closed first, so that no vote lands between the export and the close (its leftover overlap places would be
    # served before later rounds' items, and their votes never exported)
    store.close_batch(batch)
    manifest = export(store, partial / "final", batch, config.min_votes)
    agreement = stats(store, batch)
    metrics = {"pairs": manifest["rows"], "ties": manifest["ties"], "both_bad": manifest["both_bad"],
               "votes": agreement["votes"], "krippendorff_alpha": agreement["krippendorff_alpha"],
               "content_hash": manifest["content_hash"], "store": shown_url(url), "batch": batch}
    if agreement["rankings"]:
        metrics.update(rankings=agreement["rankings"], kendall_tau=agreement["kendall_tau"])
    tracker.log({f"labels/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    return Outcome(metrics, partial / "final", partial, time.time() - started,
                   f"{manifest['rows']} pairs, {manifest['ties']} ties, {manifest['both_bad']} both bad",
                   artifact="dataset", extra={"prompts_taken": prompts_taken})


def batch_keys(config: PreferencesStageConfig, run: RunConfig, hashes: dict) -> dict:
    """What a batch is made under, stored with its answers: `drawn_from`, a key of the model, prompts (by their
    content `hashes`) and sampling settings; and, when simulated or AI labellers vote, `labelled_by`, a key of
    their settings and the judges' code (the AI labeller's constitution and model folder by content)."""
    settings = SAMPLING_SETTINGS if run.round > 1 else ROUND_1_SAMPLING_SETTINGS
    values = {name: getattr(config, name) for name in settings}
    if run.round == 1:
        values.update({name: getattr(config, name) for name, default in ROUND_1_CHOICES.items()
                       if getattr(config, name) != default})
    keys = {"drawn_from": hash_config({"inputs": sampled_from(hashes), **values})[:8]}
    if config.simulate_judge or config.ai_judge:  # (a `module:function` judge's code is the input simulate_judge)
        labellers = {"judge_code": hashes.get("simulate_judge"),
                     **{name: getattr(config, name) for name in MACHINE_LABELLING_SETTINGS}}
        # the AI labeller's constitution and model folder by content (a bundled name is in the settings)
        labellers.update({f"{name}_content": hashes[name] for name in ("ai_constitution", "ai_judge")
                          if name in hashes})
        keys["labelled_by"] = hash_config(labellers)[:8]
    return keys


def older_labelled_by(config: PreferencesStageConfig, run: RunConfig, hashes: dict) -> str | None:
    """The machine labellers' key as code before the AI labeller's constitution counted: a batch an AI labeller of
    a bundled model voted on keeps its votes. (One of a model folder voted as `ai/<folder>`, an account since
    named by content too: its batch is refused, as its votes would be cast again.)"""
    if not config.ai_judge or ai_model_input(config.ai_judge):
        return None
    return batch_keys(config, run, {k: v for k, v in hashes.items() if k != "ai_constitution"}).get("labelled_by")


def check_same_draw(store: Store, batch: str, keys: dict, older_labelled_by: str | None = None,
                    round: int = 1) -> None:
    """A rerun reuses its batch (and the votes cast) only when the batch was drawn from the same model, prompts and
    sampling settings: otherwise the stage would publish the old model's answers as this one's. (A later round's
    batch name holds the key already; round 1's is the run name.) Nor when machine labellers with other settings
    (another judge, noise, ...) voted on it: their votes fill the places the new ones would take. Batches from
    before a key was stored, or made for people (`rlhf label sample`: no `labelled_by`), pass that check."""
    stored = store.batch_sampling(batch)
    if stored.get("drawn_from") not in (None, keys["drawn_from"]):
        raise UserError(f"batch '{batch}' in {shown_url(store.url)} holds answers drawn from another model, prompts "
                        f"or sampling settings (key {stored['drawn_from']}, now {keys['drawn_from']}): "
                        f"{new_batch(round)}")
    if stored.get("labelled_by") not in (None, keys.get("labelled_by"), older_labelled_by):
        raise UserError(f"batch '{batch}' in {shown_url(store.url)} was voted on by simulated or AI labellers with "
                        "other settings (judge, labellers, temperature, noise, skip, overlap, gold rate, or the AI "
                        "labeller's constitution or model): the new ones would find its places taken and the old "
                        f"votes would be exported as theirs; {new_batch(round)}")


def new_batch(round: int) -> str:
    """How to label a new batch: in a later round, for that round alone (--preferences.batch is every round's, and
    round 1 would sample, label and train again)."""
    if round == 1:
        return "label a new batch with --preferences.batch NAME"
    return (f"label a new batch for round {round} alone: in the config file (the command line sets every round), a "
            f"`round-{round}:` section with preferences: {{batch: NAME}}")


def has_votes(store: Store, batch: str, min_votes: int) -> bool:
    """Whether every comparison of the batch has `min_votes` votes."""
    return all(count >= min_votes for count in store.vote_counts(batch).values())


def wait_for_votes(store: Store, batch: str, config: PreferencesStageConfig) -> None:
    """Until every comparison of the batch has min_votes votes, or an admin closes the batch (`rlhf label close`:
    the comparisons that have them are exported); interrupted, a rerun waits for what is left."""
    shown = None
    while True:
        closed = batch in store.closed_batches()  # read first: once closed, the counts below are final
        counts = store.vote_counts(batch)
        done = sum(count >= config.min_votes for count in counts.values())
        if done == len(counts):
            return
        if closed:
            if not done:
                raise UserError(f"batch '{batch}' was closed by hand before any comparison had {config.min_votes} "
                                f"vote(s): nothing to export (`rlhf label reopen {batch}`, then run the stage again)")
            print(f"[{STAGE}] batch '{batch}' was closed by hand: exporting the {done}/{len(counts)} comparisons "
                  f"with {config.min_votes} vote(s)", flush=True)
            return
        if done != shown:
            print(f"[{STAGE}] waiting for labellers: {done}/{len(counts)} comparisons have {config.min_votes} "
                  f"vote(s). Serve them with `rlhf label --db {shown_url(store.url)} serve --batch {batch}` (default "
                  "http://127.0.0.1:7860)", flush=True)
            shown = done
        time.sleep(config.poll_seconds)


PREFERENCES_STAGE = Stage("preferences", "sample candidates, collect votes (simulated or people in the app) and "
                                         "export them", PreferencesStageConfig, inputs, check, collect,
                           files=files)
