"""`rlhf preferences`: the preference stage of `rlhf run`, from candidates to a label export.

    rlhf preferences --config configs/default.yaml [--preferences.simulate_judge builtin:length ...]

1. sample the run's comparisons into the store (batch `preferences.batch`, default the run name), unless the batch
   already holds them;
2. import the gold comparisons, when `preferences.gold` names a file;
3. votes: simulated labellers (`preferences.simulate_judge`) take items from the labelling queue and vote, as
   people do in the app (overlap, gold items, skips); or the stage waits, showing progress, until every
   comparison has `preferences.min_votes` votes from people in the app;
4. export the batch's votes to `runs/<name>/preferences` (TRL's preference format), which the reward and DPO
   stages read.

Each step picks up where a killed one stopped: sampled comparisons are stored in one transaction, simulated votes
are drawn per labeller and comparison and the queue hands out only what is left, and votes stay in the store. Without
`preferences.db` (or $RLHF_DB_URL) the run keeps its own store, `runs/<name>/labels.db`.
"""
import dataclasses
import time

from preference_ui import sample
from preference_ui.config import PreferencesStageConfig
from preference_ui.gold import import_gold
from preference_ui.simulate import LabellerModel, simulate
from preference_ui.stats import stats
from rlhf.config import RunConfig
from rlhf.datasets import load_rows
from rlhf.judges import load_judge
from rlhf.label_export import export
from rlhf.runs import RunDir
from rlhf.stage import Inputs, Outcome, Stage, run_stage, start_partial
from rlhf.store import Store, run_store_url

STAGE = "preferences"


def main(config: PreferencesStageConfig, run: RunConfig) -> dict:
    return run_stage(PREFERENCES_STAGE, config, run)


def inputs(config: PreferencesStageConfig, run: RunConfig) -> dict:
    found = Inputs()
    found.add("model", lambda: sample.model_spec(config, run))
    found.add("prompts", config.prompts)
    return found.found()


def check(config: PreferencesStageConfig, run: RunConfig, found: dict) -> tuple[list, list | None]:
    """(the prompts, the gold rows), read and checked, and the simulated labellers' judge loaded: all before the
    stage creates anything, the store among them."""
    prompts = load_rows(config.prompts, "prompt")
    gold = load_rows(config.gold, "gold") if config.gold else None
    if config.simulate_judge:
        load_judge(config.simulate_judge)
    return prompts, gold


def collect(config: PreferencesStageConfig, run: RunConfig, found: dict, checked: tuple, tracker, record) -> Outcome:
    prompts, gold = checked
    started = time.time()
    url = run_store_url(run.output_root, run.name, config.db or None)
    store, batch = Store(url), config.batch or run.name
    if store.comparisons(batch):
        print(f"[{STAGE}] batch '{batch}' already sampled: {len(store.comparisons(batch))} comparisons")
    else:
        sample.main(dataclasses.replace(config, db=url), run, prompts)
    if config.gold:
        import_gold(store, config.gold, rows=gold)
    if config.simulate_judge:
        model = LabellerModel(config.simulate_temperature, 0.0, None, config.simulate_noise, config.simulate_skip)
        counts = simulate(store, config.simulate_judge, config.simulate_labellers, model, batch, config.seed,
                          config.overlap, config.gold_rate)
        print(f"[{STAGE}] simulated votes ({config.simulate_judge}): {counts}")
    else:
        wait_for_votes(store, batch, config)
    partial = RunDir(run.output_root, run.name).partial_path(STAGE)
    start_partial(STAGE, partial, resume=False)
    manifest = export(store, partial / "final", batch, config.min_votes)
    agreement = stats(store, batch)
    metrics = {"pairs": manifest["rows"], "ties": manifest["ties"], "both_bad": manifest["both_bad"],
               "votes": agreement["votes"], "krippendorff_alpha": agreement["krippendorff_alpha"],
               "content_hash": manifest["content_hash"], "store": url, "batch": batch}
    tracker.log({f"labels/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    return Outcome(metrics, partial / "final", partial, time.time() - started,
                   f"{manifest['rows']} pairs, {manifest['ties']} ties, {manifest['both_bad']} both bad",
                   artifact="dataset")


def wait_for_votes(store: Store, batch: str, config: PreferencesStageConfig) -> None:
    """Until every comparison of the batch has min_votes votes; interrupted, a rerun waits for what is left."""
    shown = None
    while True:
        counts = store.vote_counts(batch)
        done = sum(count >= config.min_votes for count in counts.values())
        if done == len(counts):
            return
        if done != shown:
            print(f"[{STAGE}] waiting for labellers: {done}/{len(counts)} comparisons have {config.min_votes} "
                  f"vote(s). Serve them with `rlhf label --db {store.url} serve --batch {batch}` (default "
                  "http://127.0.0.1:7860)", flush=True)
            shown = done
        time.sleep(config.poll_seconds)


PREFERENCES_STAGE = Stage("preferences", "sample candidates, collect votes (simulated or people in the app) and "
                                         "export them", PreferencesStageConfig, inputs, check, collect)
