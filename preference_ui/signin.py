"""Sign-in for `rlhf label serve`: password checks off the event loop, throttled per account and per address.

Gradio's /login route awaits the `auth` callable on the server's event loop, the loop that also answers every
labelling event. `SignInGuard.sign_in` is that callable. The password check (scrypt, tens of milliseconds of
CPU) runs in a thread pool of its own, at most `workers` at once whatever the number of guessers, so the loop
stays free for labellers; checks wait their turn for a worker and are let through only then, so each one sees
the outcome of those before it.

Failed attempts are counted per account name (known or not: unknown names are treated exactly like real ones)
and per client address. After `free` failures, the next attempt on that name or from that address is held until
a delay after the last failure that doubles from `delay` seconds with each failure; at `lockout` failures the
name or address is locked for `lockout_seconds`. An attempt that arrives while another is held for the same name
or address, or while locked, is refused with HTTP 429 without a check, answered once the name or address would
take an attempt again (1 to 10 seconds), so a refused guesser cannot spin. A success clears the account's count;
an address's failures are forgiven only after `lockout_seconds` without one, so a valid account cannot be used
to reset the count of an address that is guessing others.

Behind a reverse proxy every request comes from the proxy's address: the per-address count then covers all
users, and the per-account count still holds.
"""
import asyncio
import contextvars
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocketClose

MAX_WAIT = 30.0  # seconds an attempt may be held before it starts; beyond that it is refused
# A refused attempt is answered when the name or address would take one again, but after 1 to 10 seconds: a
# refused guesser cannot spin (an open request costs Gradio's server some CPU too, measured: ~5 ms a second).
REFUSAL_PAUSE = (1.0, 10.0)
SESSION_COOKIE = b"access-token"  # Gradio's session cookies: access-token-<id> and access-token-unsecure-<id>
MAX_RECORDS = 10_000  # idle counts are dropped beyond this many (unknown names could grow it without end)

client_address = contextvars.ContextVar("client_address", default="unknown")


class ClientAddress:
    """ASGI middleware that makes each HTTP request's peer address readable to the sign-in check (Gradio calls
    `auth` with the name and password only)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("client"):
            return await self.app(scope, receive, send)
        token = client_address.set(scope["client"][0])
        try:
            await self.app(scope, receive, send)
        finally:
            client_address.reset(token)


class SameOrigin:
    """ASGI middleware refusing (403) a request sent by another site's page. Served on any name but localhost,
    Gradio lets every origin read its answers with the session cookie (SameSite=None): a page a signed-in admin
    visited could read their session token and act as them. A browser names the page's origin on such requests;
    it must be this app's own: the Host the request came to, or behind a proxy its X-Forwarded-Host."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and not own_origin(origin, headers):
                if scope["type"] == "websocket":
                    return await WebSocketClose(code=1008)(scope, receive, send)
                return await PlainTextResponse("Refused: a request from another site's page.",
                                               status_code=403)(scope, receive, send)
        await self.app(scope, receive, send)


def own_origin(origin: str, headers: Headers) -> bool:
    """Whether the page's `origin` is the host the request was sent to (default ports left out on both sides)."""
    page = urlsplit(origin)
    default = {"http": 80, "https": 443}.get(page.scheme)

    def place(netloc: str) -> tuple[str, int | None]:
        parsed = urlsplit(f"//{netloc.strip().lower()}")
        return parsed.hostname or "", parsed.port if parsed.port != default else None

    if page.hostname is None:  # "null": a sandboxed frame or a file
        return False
    hosts = [headers.get("host", ""), headers.get("x-forwarded-host", "").split(",")[0]]
    return place(page.netloc) in [place(host) for host in hosts if host]


class SessionExpiry:
    """ASGI middleware that ends every signed-in session `seconds` after its sign-in. Gradio keeps a session token
    for as long as the server runs (a browser left signed in on a shared machine stayed signed in for weeks). Each
    token is timed from the sign-in answer that sets its cookie; a request whose token cookie is past its time, or
    was never issued by this server, reaches Gradio without it: the labeller's next click is refused as not
    signed in, and a reload asks for the password again. Gradio's own token table is left alone (its sign-out
    walks it from another thread)."""

    def __init__(self, app, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.app, self.seconds, self.clock = app, seconds, clock
        self.issued: dict[str, float] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        now = self.clock()
        for token in [token for token, issued in self.issued.items() if now - issued > self.seconds]:
            del self.issued[token]
        scope = {**scope, "headers": [(name, self.live_cookies(value) if name == b"cookie" else value)
                                      for name, value in scope["headers"]]}

        async def timed_send(message):
            if message["type"] == "http.response.start":
                for name, value in message.get("headers", []):
                    cookie = value.split(b";")[0]
                    if name == b"set-cookie" and cookie.startswith(SESSION_COOKIE) and not cookie.endswith(b"="):
                        self.issued.setdefault(cookie.split(b"=", 1)[1].decode("latin-1"), self.clock())
            await send(message)
        await self.app(scope, receive, timed_send)

    def live_cookies(self, header: bytes) -> bytes:
        """The Cookie header without session cookies whose token is not live."""
        kept = [pair for pair in header.split(b";") if not pair.strip().startswith(SESSION_COOKIE)
                or pair.strip().split(b"=", 1)[-1].decode("latin-1") in self.issued]
        return b";".join(kept)


@dataclass
class Attempts:
    """Failed sign-ins of one account name or one client address."""
    failures: int = 0
    last_failure: float = float("-inf")
    locked_until: float = 0.0
    waiting: bool = False  # an attempt is held until its delay has passed


class SignInGuard:
    def __init__(self, check: Callable[[str, str], bool], free: int = 3, delay: float = 1.0, lockout: int = 10,
                 lockout_seconds: float = 900.0, workers: int = 1, log: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic):
        self.check, self.free, self.delay, self.lockout = check, free, delay, lockout
        self.lockout_seconds, self.log, self.clock = lockout_seconds, log, clock
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sign-in")
        self.slots = asyncio.Semaphore(workers)
        self.records: dict[str, Attempts] = defaultdict(Attempts)

    def wait_after(self, failures: int) -> float:
        """Seconds from a failure to the next attempt: none for the first `free`, then doubling."""
        return 0.0 if failures < self.free else min(self.delay * 2 ** (failures - self.free), MAX_WAIT)

    async def sign_in(self, name: str, password: str) -> bool:
        """Gradio's `auth`. It must be a coroutine function (not an object with an async __call__): Gradio would
        take an unawaited coroutine for a yes."""
        address = client_address.get()
        keys = (f"account '{name}'", f"address {address}")
        self.prune()
        records = [self.records[key] for key in keys]
        while True:
            wait, refusal = self.gate(keys, records)
            if refusal:
                self.log(f"sign-in refused for '{name}' from {address}: {refusal}")
                await asyncio.sleep(self.refusal_pause(records))
                raise HTTPException(status_code=429, detail=f"Too many failed sign-ins: {refusal}")
            if wait > 0:
                await self.hold(records, wait)
                continue
            async with self.slots:
                # Checks queue for a slot; the gate is asked again once one is free, so every check sees the
                # outcome of those before it (a burst of parallel guesses cannot all pass a gate still open).
                if self.gate(keys, records) != (0.0, ""):
                    continue
                signed_in = await asyncio.get_running_loop().run_in_executor(self.pool, self.check, name, password)
            break
        if signed_in:
            self.records.pop(keys[0], None)
        else:
            self.failed(keys, records)
        return signed_in

    def refusal_pause(self, records: list[Attempts]) -> float:
        now = self.clock()
        free_in = max(max(record.locked_until, record.last_failure + self.wait_after(record.failures)) - now
                      for record in records)
        return min(max(free_in, REFUSAL_PAUSE[0]), REFUSAL_PAUSE[1])

    def gate(self, keys, records: list[Attempts]) -> tuple[float, str]:
        """(seconds to wait, refusal): an attempt may go ahead when both are empty."""
        now, wait = self.clock(), 0.0
        for key, record in zip(keys, records):
            if record.failures and now - record.last_failure > self.lockout_seconds:
                record.failures = 0  # quiet for a lockout period: forgiven
            if record.locked_until > now:
                return 0.0, f"{key} is locked for {record.locked_until - now:.0f} more seconds"
            wait = max(wait, record.last_failure + self.wait_after(record.failures) - now)
        if wait > 0 and any(record.waiting for record in records):
            return 0.0, "another attempt is already waiting its turn"
        if wait > MAX_WAIT:
            return 0.0, f"the next attempt may start in {wait:.0f} s"
        return max(wait, 0.0), ""

    async def hold(self, records: list[Attempts], seconds: float) -> None:
        for record in records:
            record.waiting = True
        try:
            await asyncio.sleep(seconds)
        finally:
            for record in records:
                record.waiting = False

    def failed(self, keys, records: list[Attempts]) -> None:
        now = self.clock()
        for key, record in zip(keys, records):
            record.failures += 1
            record.last_failure = now
            if record.failures >= self.lockout and record.locked_until <= now:
                record.locked_until = now + self.lockout_seconds
                self.log(f"sign-in locked for {self.lockout_seconds:.0f} s: {key} after {record.failures} failed "
                         "attempts")

    def prune(self) -> None:
        """Beyond MAX_RECORDS, drops the counts that no longer count: failures forgiven (or none), not locked,
        nothing waiting. (Dropping every idle one let a flood of made-up names reset an account's failures.)"""
        if len(self.records) <= MAX_RECORDS:
            return
        now = self.clock()
        for key in [key for key, record in self.records.items() if not record.waiting and
                    record.locked_until <= now and now - record.last_failure > self.lockout_seconds]:
            del self.records[key]
