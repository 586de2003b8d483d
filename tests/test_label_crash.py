"""bench/label_crash.py on a small load, on SQLite and on PostgreSQL: the server killed with SIGKILL mid-load and
started again loses no accepted vote, duplicates none, overfills no item, and gives each labeller back the item
it left open."""
from bench.label_crash import crash_run, parse_args


def test_a_server_killed_mid_load_loses_and_duplicates_no_vote(store_url, tmp_path):
    report = crash_run(parse_args(["--labellers", "6", "--comparisons", "40", "--overlap", "2", "--kill-after",
                                   "0.3", "--db", store_url]), tmp_path)
    assert report["accepted_before_kill"] >= 24 and report["claimed"] >= 40  # the kill came mid-load
    assert (report["lost"], report["duplicated"], report["wrong_side"]) == (0, 0, 0)
    assert report["max_labellers_per_item"] <= 2 and report["comparisons_full"] == 40
    assert report["unfinished"] == 0 and report["not_resumed"] == 0
    assert report["reconnections"] >= 1 and report["errors"]  # the labellers did see the server go
    assert report["unexpected"] <= 6  # stored, unseen: at most the one vote each labeller had in flight
