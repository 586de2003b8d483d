"""`rlhf label collect`: the preference stage of `rlhf run`, from candidates to a label export.

    rlhf label collect --config configs/default.yaml [--labels.simulate_judge builtin:length ...]

1. sample the run's comparisons into the store (batch `labels.batch`, default the run name), unless the batch
   already holds them;
2. import the gold comparisons, when `labels.gold` names a file;
3. votes: simulated labellers vote through the store (`labels.simulate_judge`), or the stage waits, showing
   progress, until every comparison has `labels.min_votes` votes from people in the app;
4. export the batch's votes to `runs/<name>/preferences` (TRL's preference format), which the reward and DPO
   stages read.

Each step picks up where a killed one stopped: sampled comparisons are stored in one transaction, simulated votes
are drawn per labeller and comparison and skipped when already cast, and votes stay in the store. Without
`labels.db` (or $RLHF_DB_URL) the run keeps its own store, `runs/<name>/labels.db`.
"""
import dataclasses
import shutil
import time

from preference_ui import sample
from preference_ui.config import LabelsConfig
from preference_ui.gold import import_gold
from preference_ui.simulate import LabellerModel, simulate
from preference_ui.stats import stats
from rlhf.config import RunConfig
from rlhf.datasets import load_rows
from rlhf.judges import load_judge
from rlhf.label_export import export
from rlhf.runs import RunDir
from rlhf.stage import running_stage
from rlhf.store import Store, run_store_url

STAGE = "preferences"


def main(config: LabelsConfig, run: RunConfig) -> dict:
    run_dir = RunDir(run.output_root, run.name)
    url = run_store_url(run.output_root, run.name, config.db or None)
    found = {"model": sample.model_spec(config, run), "prompts": config.prompts}
    # every input read and checked before the stage locks, records or creates anything (the store among them)
    prompts = load_rows(config.prompts, "prompt")
    gold = load_rows(config.gold, "gold") if config.gold else None
    if config.simulate_judge:
        load_judge(config.simulate_judge)
    with running_stage(run, STAGE, config, found) as (record, tracker):
        started = time.time()
        store, batch = Store(url), config.batch or run.name
        if store.comparisons(batch):
            print(f"[{STAGE}] batch '{batch}' already sampled: {len(store.comparisons(batch))} comparisons")
        else:
            sample.main(dataclasses.replace(config, db=url), run, prompts)
        if config.gold:
            import_gold(store, config.gold, rows=gold)
        if config.simulate_judge:
            model = LabellerModel(config.simulate_temperature, 0.0, None, config.simulate_noise)
            counts = simulate(store, config.simulate_judge, config.simulate_labellers, model, batch, config.seed)
            print(f"[{STAGE}] simulated votes ({config.simulate_judge}): {counts}")
        else:
            wait_for_votes(store, batch, config)
        partial = run_dir.partial_path(STAGE)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        manifest = export(store, partial / "final", batch, config.min_votes)
        agreement = stats(store, batch)
        metrics = {"pairs": manifest["rows"], "ties": manifest["ties"], "both_bad": manifest["both_bad"],
                   "votes": agreement["votes"], "krippendorff_alpha": agreement["krippendorff_alpha"],
                   "content_hash": manifest["content_hash"], "store": url, "batch": batch}
        final = record.publish(partial / "final", partial, metrics, time.time() - started)
        tracker.log({f"labels/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        tracker.log_artifact(f"{run.name}-preferences", "dataset", final)
        print(f"[{STAGE}] exported {manifest['rows']} pairs ({manifest['ties']} ties, {manifest['both_bad']} both "
              f"bad) to {final}")
        return metrics


def wait_for_votes(store: Store, batch: str, config: LabelsConfig) -> None:
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
