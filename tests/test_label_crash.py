"""bench/label_crash.py on a small load, on SQLite and on PostgreSQL: the server killed with SIGKILL mid-load and
started again loses no accepted vote, duplicates none, overfills no item, and gives each labeller back the item
it left open. And bench/label_load.py's wait for its guessers' process."""
import multiprocessing
import sys

import pytest

from bench.label_crash import crash_run, parse_args
from bench.label_load import guess_counts, summary


def test_a_server_killed_mid_load_loses_and_duplicates_no_vote(store_url, tmp_path):
    report = crash_run(parse_args(["--labellers", "6", "--comparisons", "40", "--overlap", "2", "--kill-after",
                                   "0.3", "--db", store_url]), tmp_path)
    assert report["accepted_before_kill"] >= 24 and report["claimed"] >= 40  # the kill came mid-load
    assert (report["lost"], report["duplicated"], report["wrong_side"]) == (0, 0, 0)
    assert report["max_labellers_per_item"] <= 2 and report["comparisons_full"] == 40
    assert report["unfinished"] == 0 and report["not_resumed"] == 0
    assert report["reconnections"] >= 1 and report["errors"]  # the labellers did see the server go
    assert report["unexpected"] <= 6  # stored, unseen: at most the one vote each labeller had in flight


def test_the_load_benchmark_fails_instead_of_waiting_when_its_guessers_process_dies():
    """bench/label_load.py waited forever for the counts of a guessers' process that had died."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    attacker = context.Process(target=sys.exit, args=(3,))
    attacker.start()
    with pytest.raises(RuntimeError, match=r"ended without its counts \(exit code 3\)"):
        guess_counts(attacker, results)
    sender = context.Process(target=results.put, args=([200, 401],))  # one that sent them before it ended
    sender.start()
    sender.join()
    assert guess_counts(sender, results) == [200, 401]


def test_the_load_benchmarks_round_summary_says_when_no_vote_went_through():
    """A round where every labeller failed to sign in crashed the summary (the median of nothing) before the
    errors were printed."""
    assert summary({"latencies": [], "errors": ["sign-in refused"] * 3}) == "no votes went through (3 error(s))"
    assert summary({"latencies": [0.1, 0.2, 0.3], "votes_per_s": 12.0, "cpu_ms_per_vote": 4.0}) == \
        "12.0 votes/s, p50 200 ms, p95 300 ms, server CPU 4.0 ms/vote"
