"""Crash safety of the labelling app: N labellers vote through `rlhf label serve`, the server is killed with
SIGKILL mid-load, started again on the same store and port, and the labellers sign in again and finish the queue.

Each labeller speaks Gradio's protocol as the browser does (preference_ui.loadtest.BrowserLikeClient) and votes
for the side showing "good <n>" as fast as the server answers. A vote counts as accepted only when the labeller saw
"Saved your vote"; a request cut off by the kill has an unknown outcome. When the server is gone a labeller waits
for it, signs in again and asks for its item. Checked afterwards, against the store:

- every vote a labeller saw accepted is stored, exactly once (lost, duplicated) and on the side they chose;
- no item went to more than `--overlap` labellers;
- labellers continue where they were: a labeller whose last shown item was not answered before the kill (no vote
  stored) gets that same item back first.

    .venv/bin/python bench/label_crash.py [--labellers 20] [--comparisons 200] [--overlap 3] [--db URL | --postgres]

Last lines: `lost: X`, then `duplicated: Y` (targets 0 and 0).
"""
import argparse
import http.client
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from preference_ui.loadtest import (BrowserLikeClient, audit, free_port, good_side, item_label,  # noqa: E402
                                    new_database, prepare_store, scratch_postgres, start_server, stop_server)

EMPTY = "### Nothing left to label"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labellers", type=int, default=20)
    parser.add_argument("--comparisons", type=int, default=200)
    parser.add_argument("--overlap", type=int, default=3)
    parser.add_argument("--kill-after", type=float, default=0.4,
                        help="kill the server once this share of all votes has been accepted")
    parser.add_argument("--db", help="an empty database URL (default: a new SQLite file)")
    parser.add_argument("--postgres", action="store_true",
                        help="on a throwaway PostgreSQL server started from Debian's binaries")
    return parser.parse_args(argv)


class Labeller:
    """One labeller's loop, through the crash: `claimed` holds the items they saw accepted, `resumed` whether
    each reconnection showed the item left open before it (where it had to)."""

    def __init__(self, url: str, name: str, server_up: threading.Event):
        self.url, self.name, self.server_up = url, name, server_up
        self.claimed, self.resumed, self.errors = [], [], []
        self.shown: str | None = None  # the item on screen, not yet answered
        self.finished = False  # emptied its queue (a labeller that gave up after 50 errors has not)

    def run(self, votes_seen) -> None:
        while True:
            try:
                if self.label(votes_seen):
                    self.finished = True
                    return
            except (OSError, RuntimeError, http.client.HTTPException, httpx.HTTPError, ValueError) as err:
                # the server went away mid-request (a refused connection, a cut-off answer)
                self.errors.append(repr(err))
                if len(self.errors) > 50:
                    return
                self.server_up.wait()
                time.sleep(0.2)

    def label(self, votes_seen) -> bool:
        """Signs in and votes until the queue is empty (True); raises when the server goes away."""
        client = BrowserLikeClient(self.url, self.name)
        try:
            _, title, _, left, right, *_ = client.call("next_item")
            if self.shown is not None:  # back after the crash: the open item must be the one left unanswered
                self.resumed.append((self.shown, item_label(title)))
            while title != EMPTY:
                self.shown = item_label(title)
                _, title, _, left_next, right_next, _, message, *_ = client.call(
                    good_side(left, right), "clear", "", "", self.shown, None)
                if not message.startswith(f"Saved your vote on item {self.shown}."):  # the last adds "queue empty"
                    raise RuntimeError(f"vote on item {self.shown} not saved: {message}")
                self.claimed.append(self.shown)
                self.shown = None
                votes_seen()
                left, right = left_next, right_next
        finally:
            client.close()  # a new client signs in after each reconnection
        return True


def crash_run(args, root: Path) -> dict:
    """The run described in the module docstring, with its servers' logs (and the SQLite store) in `root`; its
    audit."""
    db_url = args.db or f"sqlite:///{root / 'labels.db'}"
    names = prepare_store(db_url, args.labellers, args.comparisons)
    port = free_port()
    server = start_server(db_url, port, args.overlap, log=root / "serve-1.log")
    server_up, accepted, lock = threading.Event(), [0], threading.Lock()
    server_up.set()
    kill_at = int(args.kill_after * args.comparisons * args.overlap)
    killed = threading.Event()

    def votes_seen() -> None:
        with lock:
            accepted[0] += 1
            if accepted[0] >= kill_at and not killed.is_set():
                killed.set()

    labellers = [Labeller(f"http://127.0.0.1:{port}", name, server_up) for name in names]
    # daemons: if the restarted server fails to start, labellers waiting for it must not keep the process alive
    threads = [threading.Thread(target=labeller.run, args=(votes_seen,), daemon=True) for labeller in labellers]
    for thread in threads:
        thread.start()
    if not killed.wait(timeout=600):
        stop_server(server)
        raise RuntimeError(f"fewer than {kill_at} votes were accepted in 10 minutes: see {root}/serve-1.log")
    server_up.clear()
    server.send_signal(signal.SIGKILL)
    server.wait()
    at_kill = accepted[0]
    server = start_server(db_url, port, args.overlap, log=root / "serve-2.log")
    server_up.set()
    try:
        for thread in threads:
            thread.join(timeout=600)
    finally:
        stop_server(server)
    report = audit(db_url, {labeller.name: labeller.claimed for labeller in labellers})
    resumptions = [pair for labeller in labellers for pair in labeller.resumed]
    stored = stored_items(db_url)
    report.update(
        accepted_before_kill=at_kill, reconnections=len(resumptions),
        not_resumed=sum(back != shown for labeller in labellers for shown, back in labeller.resumed
                        if (labeller.name, shown) not in stored),
        unfinished=sum(not labeller.finished for labeller in labellers),
        errors=[error for labeller in labellers for error in labeller.errors], store=db_url.split(":")[0],
        comparisons_full=sum(count == args.overlap for count in votes_per_item(db_url).values()))
    return report


def stored_items(db_url: str) -> set[tuple[str, str]]:
    """(labeller name, item label) of every stored vote."""
    from rlhf.store import Store

    store = Store(db_url)
    names = {user.id: user.name for user in store.users()}
    items = {(names[vote.user_id], store.item_label(vote.comparison_id)) for vote in store.votes()}
    store.engine.dispose()
    return items


def votes_per_item(db_url: str) -> Counter:
    from rlhf.store import Store

    store = Store(db_url)
    counts = Counter(vote.comparison_id for vote in store.votes())
    store.engine.dispose()
    return counts


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="label-crash-"))
    if args.postgres:
        with scratch_postgres() as server:
            args.db = new_database(server, "crash")
            report = crash_run(args, root)
    else:
        report = crash_run(args, root)
    print(f"{args.labellers} labellers, {args.comparisons} comparisons x overlap {args.overlap} on {report['store']}; "
          f"server killed after {report['accepted_before_kill']} accepted votes and started again")
    print(f"stored {report['stored']} votes, {report['claimed']} seen accepted; {report['comparisons_full']} "
          f"comparisons full; most labellers on one item {report['max_labellers_per_item']}; wrong side "
          f"{report['wrong_side']}; unexpected (outcome unseen at the kill) {report['unexpected']}")
    print(f"reconnections {report['reconnections']}, not given back their open item {report['not_resumed']}, "
          f"labellers unfinished {report['unfinished']}, connection errors seen {len(report['errors'])}")
    print(f"lost: {report['lost']}")
    print(f"duplicated: {report['duplicated']}")
    healthy = (report["lost"] == report["duplicated"] == report["wrong_side"] == report["not_resumed"]
               == report["unfinished"] == 0 and report["max_labellers_per_item"] <= args.overlap)
    if healthy:
        shutil.rmtree(root)
    else:
        print(f"the servers' logs are kept in {root}", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
