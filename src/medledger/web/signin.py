"""What a sign-in may cost the node, and who may try how often.

Opening a keystore is an Argon2id derivation: hundreds of MB and most of a second of a core,
by design. The same process serves ABCI to CometBFT, FHIR, HL7 and export, so sign-ins get
their own small pool (`KeyDerivations`: `workers` threads, at most `queue` more waiting) and
never the default executor those share; when the pool is full a sign-in is answered "busy,
retry" at once, not queued without bound.

A stranger's guesses are limited three ways, each within `window` seconds:
- per name: `failures` wrong passphrases lock the name (a guessing attacker gets a handful of
  tries per window, a patient who mistyped waits a few minutes);
- per source address: `address_failures` failed sign-ins, and `address_attempts` sign-ins of
  any outcome, lock the address — so random names, which the per-name limit never sees twice,
  cost at most that many derivations per address and window.

An unknown name costs the same derivation as a known one (with the parameters of a keystore
on disk), so neither the answer nor its timing tells who has a keystore here; the address
limit and the pool bound what that costs.

The address is `request.remote`, the TCP peer, as aiohttp reports it. Forwarded headers are
not trusted by default: any client can write `X-Forwarded-For`. Behind a reverse proxy every
member therefore shares the proxy's address and limit; either raise the address limits in
`[portal]`, or install a middleware for the trusted proxy that sets `request.remote` from its
header (e.g. aiohttp-remotes), and let the proxy limit rates too. IPv6 addresses are limited
per /64 network, the block one subscriber is usually given.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
Clock = Callable[[], float]

THREAD_PREFIX = "portal-signin"
# Names and addresses whose recent sign-ins are remembered at once; the oldest are forgotten
# first (by then their window has usually passed).
MAX_TRACKED = 100_000


class SignInBusy(Exception):
    """Every sign-in slot is taken: retry in a few seconds."""


class KeyDerivations:
    """A pool of its own for keystore derivations: `workers` threads, and at most `queue`
    sign-ins waiting for one. Count and pool are touched on the event loop only."""

    def __init__(self, workers: int = 2, queue: int = 8) -> None:
        self.workers = workers
        self.capacity = workers + queue
        self.pending = 0
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=THREAD_PREFIX)

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` on the pool; SignInBusy at once when it is full."""
        if self.pending >= self.capacity:
            raise SignInBusy("too many sign-ins at this moment")
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)
        finally:
            self.pending -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class RecentEvents:
    """Times of recent events per key, within `window` seconds, for at most `max_keys` keys."""

    def __init__(self, window: float, clock: Clock, max_keys: int = MAX_TRACKED) -> None:
        self.window = window
        self.clock = clock
        self.max_keys = max_keys
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str) -> deque[float]:
        now = self.clock()
        events = self._events.get(key)
        if events is None:
            return deque()
        while events and now - events[0] >= self.window:
            events.popleft()
        if not events:
            del self._events[key]
        return events

    def count(self, key: str) -> int:
        return len(self._recent(key))

    def wait(self, key: str, limit: int) -> float:
        """Seconds until `key` has fewer than `limit` events in the window; 0 when it has."""
        events = self._recent(key)
        if len(events) < limit:
            return 0.0
        return max(0.0, events[-limit] + self.window - self.clock())

    def add(self, key: str) -> None:
        events = self._recent(key)
        if key not in self._events:
            while len(self._events) >= self.max_keys:
                self._events.popitem(last=False)
            self._events[key] = events
        self._events.move_to_end(key)
        events.append(self.clock())

    def clear(self, key: str) -> None:
        self._events.pop(key, None)


def address_key(remote: str | None) -> str:
    """The key a source address is limited under: an IPv4 address, an IPv6 /64 network."""
    if not remote:
        return "unknown"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)


class AddressLimiter:
    """Sign-ins per source address: at most `attempts` of any outcome and `failures` failed
    ones within `window` seconds."""

    def __init__(
        self, attempts: int, failures: int, window: float, clock: Clock = time.monotonic
    ) -> None:
        self.attempts = attempts
        self.failures = failures
        self._attempts = RecentEvents(window, clock)
        self._failures = RecentEvents(window, clock)

    def locked_for(self, address: str) -> float:
        """Seconds until `address` may try again; 0 when it may try now."""
        return max(
            self._attempts.wait(address, self.attempts),
            self._failures.wait(address, self.failures),
        )

    def attempted(self, address: str) -> None:
        self._attempts.add(address)

    def failed(self, address: str) -> None:
        self._failures.add(address)
