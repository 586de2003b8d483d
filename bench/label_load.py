"""Load on the labelling app: N labellers voting at once through a real `rlhf label serve`, side by side with a
bare Gradio app of the same shape (same events, inputs, outputs and sign-in, but no database: it hands out
numbered items from memory). The bare app is the yardstick: Gradio's own cost per event on this machine, so the
ratio says how much of it our labelling logic leaves.

Each labeller signs in and votes as fast as the server answers, speaking Gradio's protocol the way the browser
does (preference_ui.loadtest.BrowserLikeClient); rounds alternate ours / bare. Then one more round of ours with
`--guessers` clients guessing passwords all the while (wrong passwords for the labellers' names and for unknown
names, each client as fast as the server answers it): the labellers' latency then shows whether guessing can
slow labelling, and the guess counts show the throttling (checked: a password was checked and refused;
throttled: refused with HTTP 429 without a check).

Prints votes/s and latency percentiles per vote (request to result, as a labeller waits for the next item) for
both apps, the store audit of ours (lost, duplicated, wrong-side votes), the server's CPU time per vote
(steadier than wall-clock figures on a shared machine), the guessing round, `p95_ms: X` (ours, over all rounds, the
guessing one included), and last `ratio: X` (our votes/s over the bare app's, medians over the plain rounds).
Target for N=20 on SQLite, with 16 guessers: 0 lost, 0 duplicated, p95 <= 300 ms.

    .venv/bin/python bench/label_load.py --labellers 20 --votes 50 [--rounds 2] [--guessers 16] [--db URL]
"""
import argparse
import itertools
import multiprocessing
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from preference_ui.loadtest import (PASSWORD, BrowserLikeClient, audit, free_port, good_side,  # noqa: E402
                                    item_label, prepare_store, start_server, stop_server, wait_for_port)


def serve_bare(port: int, threads: int) -> None:
    """The yardstick app: the labelling app's events and outputs, answered from memory."""
    import gradio as gr

    def box(text: str) -> str:
        return (f'<div class="answer"><div class="as-markdown"><p>{text}</p></div>'
                f'<pre class="as-text">{text}</pre></div>')

    def shown(number: int, message: str = "", first: bool = False):
        # after the first item, a pair after a pair: the ranking panel's outputs are left as they are, as ours
        panels = ((gr.Column(visible=True), gr.Column(visible=False), *[gr.HTML("", visible=False)] * 6,
                   *[gr.Button(visible=False)] * 6) if first else [gr.skip()] * 14)
        return ({"item": number}, f"### Item {number}", box(f"Question {number}?"), box(f"good {number}"),
                box(f"poor {number}"), f"<div>{number} votes</div>", message, "clear",
                *[gr.Button(interactive=True)] * 5, *panels, "", "", "", str(number))

    def vote(strength, note, written, page_label, state):
        return shown(state["item"] + 1, f"Saved your vote on item {state['item']}.")

    with gr.Blocks() as app:
        state = gr.State(None)
        strength, note, written = gr.Radio(["clear", "slight"], value="clear"), gr.Textbox(), gr.Textbox()
        with gr.Column() as pairs:
            gr.Markdown()
        with gr.Column(visible=False) as ranking:
            boxes = [gr.HTML(visible=False) for _ in range(6)]
            picks = [gr.Button(visible=False) for _ in range(6)]
        page_label = gr.Textbox(visible=False, value="")
        outputs = [state, gr.Markdown(), gr.HTML(), gr.HTML(), gr.HTML(), gr.HTML(), gr.Markdown(), strength,
                   *[gr.Button() for _ in range(5)], pairs, ranking, *boxes, *picks, gr.Textbox(), note, written,
                   page_label]
        gr.Button().click(lambda: shown(0, first=True), None, outputs, api_name="next_item", queue=False)
        for name in ("vote_a", "vote_b"):
            gr.Button().click(vote, [strength, note, written, page_label, state], outputs, api_name=name,
                              queue=False)
    app.queue().launch(server_name="127.0.0.1", server_port=port, auth=lambda name, password: password == PASSWORD,
                       quiet=True, max_threads=threads)


def labeller(url: str, name: str, votes: int, claimed: list, latencies: list, errors: list, start) -> None:
    try:
        client = BrowserLikeClient(url, name)
        _, title, _, left, right, *_ = client.call("next_item")
        start.wait()
        for _ in range(votes):
            shown = item_label(title)
            began = time.perf_counter()
            # as a browser: the page's item label with the answer
            _, title, _, left, right, _, message, *_ = client.call(good_side(left, right), "clear", "", "", shown,
                                                                   None)
            latencies.append(time.perf_counter() - began)
            if message != f"Saved your vote on item {shown}.":
                raise RuntimeError(f"vote on item {shown} not saved: {message}")
            claimed.append(shown)
    except Exception as err:
        errors.append(f"{name}: {err!r}")
        start.abort()  # the others (and drive) stop waiting for one who will never arrive


def guesser(url: str, names: list[str], outcomes: list, stop) -> None:
    """Wrong passwords for the given names in turn, each sent once the previous one is answered."""
    with httpx.Client(base_url=url, timeout=120) as http:
        for name, attempt in zip(itertools.cycle(names), itertools.count()):
            if stop.is_set():
                return
            answer = http.post("/login", data={"username": name, "password": f"guess-{attempt}"})
            outcomes.append(answer.status_code)


def guessing(url: str, targets: list[list[str]], ready, stop, results) -> None:
    """The guessers, one thread each, in a process of their own (as an attacker would be): in the labellers'
    process their threads would hold its interpreter lock and be measured as server latency."""
    outcomes = []
    threads = [threading.Thread(target=guesser, args=(url, names, outcomes, stop)) for names in targets]
    ready.set()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(outcomes)


def drive(url: str, names: list[str], votes: int, server: psutil.Process, guessers: int = 0) -> dict:
    """All labellers at once, released together once signed in, with `guessers` password guessers starting at
    the same moment and stopping when the labellers are done; also the server's CPU time per vote."""
    claimed, latencies, errors, guesses = {name: [] for name in names}, [], [], []
    start = threading.Barrier(len(names) + 1)
    threads = [threading.Thread(target=labeller, args=(url, name, votes, claimed[name], latencies, errors, start),
                                daemon=True) for name in names]  # daemons: a failed run does not wait for them
    spawn = multiprocessing.get_context("spawn")
    ready, stop, results = spawn.Event(), spawn.Event(), spawn.Queue()
    targets = [[names[i % len(names)], f"nobody{i}"] for i in range(guessers)]  # a real name and an unknown one
    attacker = spawn.Process(target=guessing, args=(url, targets, ready, stop, results)) if guessers else None
    for thread in threads:
        thread.start()
    if attacker:
        attacker.start()
        while not ready.wait(timeout=1):
            if not attacker.is_alive():
                start.abort()
                raise RuntimeError(f"the guessers' process ended before it started (exit code {attacker.exitcode})")
    try:
        start.wait()
    except threading.BrokenBarrierError:  # a labeller failed to sign in or to get an item: named in `errors`
        pass
    began, cpu_before = time.perf_counter(), sum(server.cpu_times()[:2])
    for thread in threads:
        thread.join()
    elapsed, cpu = time.perf_counter() - began, sum(server.cpu_times()[:2]) - cpu_before
    if attacker:
        stop.set()
        guesses = guess_counts(attacker, results)
    return {"claimed": claimed, "latencies": latencies, "errors": errors, "votes_per_s": len(latencies) / elapsed,
            "cpu_ms_per_vote": 1000 * cpu / max(len(latencies), 1), "seconds": elapsed,
            "guesses": {code: guesses.count(code) for code in set(guesses)}}


def guess_counts(attacker, results) -> list[int]:
    """The status codes the guessers' process sends back once stopped; an error, not a wait, if it died."""
    while True:
        alive = attacker.is_alive()  # read first: a process that had ended had sent whatever it would send
        try:
            guesses = results.get(timeout=1)
            break
        except queue.Empty:
            if not alive:
                raise RuntimeError(f"the guessers' process ended without its counts (exit code {attacker.exitcode})"
                                   ) from None
    attacker.join()
    return guesses


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def summary(result: dict) -> str:
    latencies = result["latencies"]
    if not latencies:  # every labeller failed (the errors are printed at the end)
        return f"no votes went through ({len(result['errors'])} error(s))"
    return (f"{result['votes_per_s']:.1f} votes/s, p50 {1000 * statistics.median(latencies):.0f} ms, "
            f"p95 {1000 * percentile(latencies, 0.95):.0f} ms, server CPU {result['cpu_ms_per_vote']:.1f} ms/vote")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labellers", type=int, default=20)
    parser.add_argument("--votes", type=int, default=50, help="votes per labeller per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--guessers", type=int, default=16, help="password guessers in the last round (0: none)")
    parser.add_argument("--overlap", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4, help="preferences.concurrency of the server")
    parser.add_argument("--db", help="an empty database URL (default: a new SQLite file)")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for flag in ("labellers", "votes", "rounds", "overlap", "concurrency"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.guessers < 0:
        parser.error("--guessers must be 0 or more")
    if args.serve_bare:
        serve_bare(args.serve_bare, args.concurrency)
        return 0

    root = Path(tempfile.mkdtemp(prefix="label-load-"))
    db_url = args.db or f"sqlite:///{root / 'labels.db'}"
    total = args.labellers * args.votes * (args.rounds + (args.guessers > 0))
    names = prepare_store(db_url, args.labellers, comparisons=total // args.overlap + total // 5)
    ours_port, bare_port = free_port(), free_port()
    ours = start_server(db_url, ours_port, args.overlap, args.concurrency, log=root / "serve.log")
    bare = subprocess.Popen([sys.executable, __file__, "--serve-bare", str(bare_port), "--concurrency",
                             str(args.concurrency)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    results = {"ours": [], "bare": []}
    try:
        wait_for_port(bare, bare_port)
        for round_number in range(args.rounds):
            for kind, port, process in (("ours", ours_port, ours), ("bare", bare_port, bare)):
                result = drive(f"http://127.0.0.1:{port}", names, args.votes, psutil.Process(process.pid))
                results[kind].append(result)
                print(f"round {round_number} {kind:4}: {summary(result)}", flush=True)
        if args.guessers:
            guessed = drive(f"http://127.0.0.1:{ours_port}", names, args.votes, psutil.Process(ours.pid),
                            args.guessers)
            print(f"guessing round ours, {args.guessers} guessers: {summary(guessed)}", flush=True)
    finally:
        stop_server(ours)
        stop_server(bare)
    plain_rounds = list(results["ours"])
    if args.guessers:
        results["ours"].append(guessed)
    claimed = {name: [item for result in results["ours"] for item in result["claimed"][name]] for name in names}
    report = audit(db_url, claimed)
    errors = [error for kind in results.values() for result in kind for error in result["errors"]]
    ours_latencies = [latency for result in results["ours"] for latency in result["latencies"]]
    if not ours_latencies or not all(result["latencies"] for result in results["bare"]):
        for error in errors[:5]:
            print(f"error: {error}")
        print(f"no votes went through (server log: {root / 'serve.log'})", file=sys.stderr)
        return 1
    ours_rate = statistics.median(result["votes_per_s"] for result in plain_rounds)
    bare_rate = statistics.median(result["votes_per_s"] for result in results["bare"])
    print(f"labellers: {args.labellers}  votes each per round: {args.votes}  rounds: {args.rounds}  overlap: "
          f"{args.overlap}  store: {db_url.split(':')[0]}  server log: {root / 'serve.log'}")
    for error in errors[:5]:
        print(f"error: {error}")
    print(f"votes_per_s: {ours_rate:.1f}  bare gradio events/s: {bare_rate:.1f}")
    print(f"stored: {report['stored']}  lost: {report['lost']}  duplicated: {report['duplicated']}  "
          f"unexpected: {report['unexpected']}  wrong_side: {report['wrong_side']}")
    print(f"p50_ms: {1000 * statistics.median(ours_latencies):.0f}  p99_ms: "
          f"{1000 * percentile(ours_latencies, 0.99):.0f}")
    if args.guessers:
        codes = guessed["guesses"]
        print(f"guesses: {sum(codes.values())} in {guessed['seconds']:.0f} s by {args.guessers} clients, "
              f"{codes.get(400, 0)} checked, {codes.get(429, 0)} throttled, {codes.get(200, 0)} signed in, other "
              f"{sum(count for code, count in codes.items() if code not in (200, 400, 429))}")
        print(f"guessing_p95_ms: {1000 * percentile(guessed['latencies'], 0.95):.0f}")
    print(f"p95_ms: {1000 * percentile(ours_latencies, 0.95):.0f}")
    print(f"ratio: {ours_rate / bare_rate:.3f}")  # the last line, as every benchmark's
    broken_in = args.guessers and guessed["guesses"].get(200, 0)
    failed = (errors or broken_in or report["lost"] or report["duplicated"] or report["wrong_side"]
              or report["unexpected"] or report["max_labellers_per_item"] > args.overlap)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
