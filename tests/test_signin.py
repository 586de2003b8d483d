"""Sign-in throttling: the guard on its own (real time, short delays), then a real server over HTTP."""
import asyncio
import statistics
import threading
import time

import httpx
import pytest
from fastapi import HTTPException

from preference_ui.loadtest import PASSWORD, free_port, prepare_store, start_server, stop_server
from preference_ui.signin import SignInGuard, client_address

DELAY = 0.2


class Checks:
    """A password check that takes `seconds` in its thread and records how many ran at once."""

    def __init__(self, seconds: float = 0.0, password: str = "right"):
        self.seconds, self.password, self.calls, self.running, self.most = seconds, password, 0, 0, 0
        self.lock = threading.Lock()

    def __call__(self, name: str, password: str) -> bool:
        with self.lock:
            self.calls, self.running = self.calls + 1, self.running + 1
            self.most = max(self.most, self.running)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        return password == self.password


def attempt(guard: SignInGuard, name: str, password: str, address: str = "10.0.0.1"):
    """True/False for an answered attempt, "429" for a refusal; and when the answer came."""
    async def run():
        client_address.set(address)
        try:
            return await guard.sign_in(name, password)
        except HTTPException as refused:
            assert refused.status_code == 429 and "Too many failed sign-ins" in refused.detail
            return "429"
    return asyncio.run(run())


def timed(guard, name, password, address="10.0.0.1"):
    began = time.monotonic()
    outcome = attempt(guard, name, password, address)
    return outcome, time.monotonic() - began


def test_failures_past_the_free_ones_wait_twice_as_long_each_time_and_then_lock_the_account():
    lines = []
    guard = SignInGuard(Checks(), free=2, delay=DELAY, lockout=5, lockout_seconds=2, log=lines.append)
    waits = []
    for n in range(5):
        outcome, seconds = timed(guard, "ann", "wrong", address=f"10.0.0.{n}")  # one address each: the account
        assert outcome is False
        waits.append(seconds)
    assert max(waits[:2]) < DELAY / 2  # the free failures
    for seconds, expected in zip(waits[2:], (DELAY, 2 * DELAY, 4 * DELAY)):
        assert expected * 0.9 <= seconds <= expected + 0.3, waits
    outcome, seconds = timed(guard, "ann", "right", address="10.0.0.9")  # the right password, locked out
    assert outcome == "429" and seconds >= 0.9  # answered after a pause, never checked
    assert guard.check.calls == 5
    assert any("locked for 2 s: account 'ann' after 5 failed attempts" in line for line in lines)
    assert attempt(guard, "bob", "right", address="10.0.0.9") is True  # other accounts are not affected


def test_a_success_clears_the_account_and_quiet_forgives_it():
    guard = SignInGuard(Checks(), free=1, delay=DELAY, lockout=3, lockout_seconds=0.5)
    assert attempt(guard, "ann", "wrong") is False
    assert attempt(guard, "ann", "right") is True
    assert timed(guard, "ann", "wrong", "10.0.0.2")[1] < DELAY / 2  # the account's count started again
    for address in ("10.0.0.3", "10.0.0.4"):
        attempt(guard, "ann", "wrong", address)
    assert attempt(guard, "ann", "right", "10.0.0.5") == "429"
    time.sleep(0.6)  # a lockout period without failures
    assert attempt(guard, "ann", "right", "10.0.0.6") is True


def test_a_burst_of_parallel_guesses_is_checked_one_by_one_and_mostly_refused():
    checks = Checks(seconds=0.02)
    guard = SignInGuard(checks, free=2, delay=DELAY, lockout=4, lockout_seconds=60, workers=1)

    async def burst():
        client_address.set("10.0.0.1")

        async def one(n):
            try:
                return await guard.sign_in("ann", f"guess-{n}")
            except HTTPException:
                return "429"
        return await asyncio.gather(*(one(n) for n in range(40)))

    outcomes = asyncio.run(burst())
    assert checks.most == 1  # the password checks ran one at a time
    assert checks.calls <= 4 and outcomes.count(False) == checks.calls and outcomes.count("429") == 40 - checks.calls


def test_an_address_guessing_many_names_is_locked_for_every_name():
    guard = SignInGuard(Checks(), free=2, delay=0.05, lockout=4, lockout_seconds=2)
    for n in range(4):
        assert attempt(guard, f"name{n}", "wrong", "10.0.0.7") is False
    assert attempt(guard, "fresh-name", "right", "10.0.0.7") == "429"
    assert attempt(guard, "fresh-name", "right", "10.0.0.8") is True


def test_the_event_loop_keeps_running_while_passwords_are_checked():
    checks = Checks(seconds=0.3)
    guard = SignInGuard(checks, free=100, lockout=1000, workers=1)

    async def run():
        client_address.set("10.0.0.1")
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)
        task = asyncio.create_task(ticker())
        began = time.monotonic()
        await asyncio.gather(*(guard.sign_in(f"user{n}", "wrong") for n in range(4)))
        task.cancel()
        return ticks, time.monotonic() - began

    ticks, seconds = asyncio.run(run())
    assert checks.most == 1 and seconds >= 4 * 0.3  # bounded: one check at a time
    assert ticks >= 0.5 * seconds / 0.01  # the loop was free all along


@pytest.fixture()
def served(tmp_path):
    """A server with small sign-in limits (free 1, delay 0.2 s, lockout 3) and one with none to speak of."""
    servers = []

    def start(*options):
        db_url = f"sqlite:///{tmp_path / f'labels{len(servers)}.db'}"
        prepare_store(db_url, labellers=2, comparisons=4)
        port = free_port()
        log = tmp_path / f"serve{len(servers)}.log"
        servers.append(start_server(db_url, port, overlap=1, log=log, options=options))
        return f"http://127.0.0.1:{port}", log
    yield start
    for server in servers:
        stop_server(server)


def sign_in(url: str, name: str, password: str) -> httpx.Response:
    return httpx.post(f"{url}/login", data={"username": name, "password": password}, timeout=60)


def test_over_http_failures_lock_the_account_and_the_address_and_are_logged(served):
    url, log = served("--preferences.sign_in_free_failures", "1", "--preferences.sign_in_delay", "0.2",
                      "--preferences.sign_in_lockout", "3", "--preferences.sign_in_lockout_minutes", "0.05")
    assert sign_in(url, "load00", PASSWORD).status_code == 200
    answers = [sign_in(url, "load00", "wrong-password") for _ in range(3)]
    assert [answer.status_code for answer in answers] == [400, 400, 400]
    # both at once: a refusal is answered when the lockout ends
    answers = {}
    asking = [threading.Thread(target=lambda name=name: answers.update({name: sign_in(url, name, PASSWORD)}))
              for name in ("load00", "load01")]
    for thread in asking:
        thread.start()
    for thread in asking:
        thread.join()
    assert answers["load00"].status_code == 429 and "locked" in answers["load00"].json()["detail"]
    assert answers["load01"].status_code == 429  # another account from the same address: the address is locked
    time.sleep(0.5)
    assert "sign-in locked for 3 s: account 'load00' after 3 failed attempts" in log.read_text()
    assert "sign-in locked for 3 s: address 127.0.0.1" in log.read_text()
    time.sleep(3)  # the lockout is over; the failures are forgiven after as long again without any
    assert sign_in(url, "load01", PASSWORD).status_code == 200


def test_over_http_an_unknown_name_costs_what_a_wrong_password_does(served):
    url, _ = served("--preferences.sign_in_free_failures", "1000", "--preferences.sign_in_lockout", "1000")
    known, unknown = [], []
    for n in range(10):
        for times, name in ((known, "load00"), (unknown, f"nobody{n}")):
            began = time.perf_counter()
            assert sign_in(url, name, "wrong-password").status_code == 400
            times.append(time.perf_counter() - began)
    known_ms, unknown_ms = 1000 * statistics.median(known), 1000 * statistics.median(unknown)
    # a name that does not exist was answered ~14 times faster before (2 ms vs 28 ms): now the same KDF work
    assert 0.6 <= unknown_ms / known_ms <= 1.6, (known_ms, unknown_ms)


def test_a_session_ends_session_hours_after_its_sign_in(served):
    url, _ = served("--preferences.session_hours", str(8 / 3600))  # eight seconds
    answer = sign_in(url, "load00", PASSWORD)
    assert answer.status_code == 200
    with httpx.Client(base_url=url, cookies=answer.cookies, timeout=60) as client:
        assert client.get("/gradio_api/login_check").status_code == 200
        assert client.get("/config").json().get("username") == "load00"
        time.sleep(8.5)
        assert client.get("/gradio_api/login_check").status_code == 401
        refused = client.get("/config")  # what a reload asks first: the page shows the sign-in form
        assert refused.status_code == 401 and refused.json()["detail"]["error"] == "Not authenticated"
    again = sign_in(url, "load00", PASSWORD)
    with httpx.Client(base_url=url, cookies=again.cookies, timeout=60) as client:
        assert client.get("/gradio_api/login_check").status_code == 200


def test_a_flood_of_made_up_names_does_not_reset_an_accounts_failures(monkeypatch):
    """Past MAX_RECORDS the guard drops counts, but only those already forgiven: an account at 9 failures of 10
    stays there however many names an attacker makes up meanwhile."""
    import preference_ui.signin as signin

    monkeypatch.setattr(signin, "MAX_RECORDS", 20)
    monkeypatch.setattr(signin, "REFUSAL_PAUSE", (0.0, 0.0))
    now = [1000.0]
    guard = SignInGuard(Checks(), free=20, delay=0.01, lockout=10, lockout_seconds=900, clock=lambda: now[0])
    for n in range(9):
        assert attempt(guard, "admin", "wrong", f"10.0.1.{n}") is False
    now[0] += 60  # idle for longer than any wait
    outcomes = [attempt(guard, f"made-up-{n}", "wrong", "10.0.9.9") for n in range(60)]
    assert outcomes.count(False) == 10 and outcomes.count("429") == 50  # the flooding address locked
    assert attempt(guard, "admin", "wrong", "10.0.2.1") is False  # the tenth failure
    assert attempt(guard, "admin", "right", "10.0.2.2") == "429"
    now[0] += 901  # forgiven after a lockout period without failures, and then dropped when records pile up
    assert attempt(guard, "admin", "right", "10.0.2.3") is True
    for n in range(30):
        attempt(guard, f"later-{n}", "wrong", f"10.0.3.{n}")
    assert "account 'made-up-0'" not in guard.records and len(guard.records) <= 2 * 30 + 2
