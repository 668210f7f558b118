"""API keys and per-key limits: keys are stored as SHA-256 digests, never as text, and never logged."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import threading
import time
from dataclasses import dataclass, field

from looped.config import ServeConfig
from looped.errors import ConfigError
from looped.infer.engine import Compute
from looped.serve.protocol import APIError, Ask

# The digest configs/serve.toml ships in place of real ones. No key is known to hash to it, and a server
# refuses to start while a key still has it, so the example can never be served with a guessable key.
PLACEHOLDER = "0" * 64


def hash_key(key: str) -> str:
    """The digest to put in serve.keys[].sha256 for `key` (`looped serve --hash-key`).

    Surrounding whitespace is not part of the key, as in an `Authorization: Bearer KEY` header, so a key read
    from a terminal or a pipe with its newline hashes the same.

    Raises:
        ValueError: the key is empty.
    """
    key = key.strip()
    if not key:
        raise ValueError("an API key cannot be empty")
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Key:
    name: str
    sha256: str
    tiers: list[str] = field(default_factory=list)  # empty: every tier
    loop_cap: int | None = None
    rate_per_minute: int | None = None


class Keyring:
    """Who may call, with which tiers and loops, and how often (a sliding one-minute window per key).

    Raises:
        ConfigError: a key still has the example's placeholder digest (`PLACEHOLDER`).
    """

    def __init__(self, cfg: ServeConfig, clock=time.monotonic) -> None:
        self.keys = [Key(**k) for k in cfg.keys]
        waiting = [k.name for k in self.keys if k.sha256 == PLACEHOLDER]
        if waiting:
            raise ConfigError(
                f"serve.keys {', '.join(map(repr, waiting))}: the sha256 is still the example's placeholder, "
                "which no key matches. Run `looped serve --hash-key`, type your key, and paste the digest it "
                "prints in place of the zeros (or remove the key: with no keys the server is open)"
            )
        self.clock = clock
        self._calls: dict[str, collections.deque] = {k.name: collections.deque() for k in self.keys}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def identify(self, authorization: str | None) -> Key | None:
        """The key of an `Authorization: Bearer KEY` header; None when no keys are configured; 401 else."""
        if not self.keys:
            return None
        if not authorization or not authorization.startswith("Bearer "):
            raise APIError(
                "this server needs an API key: send 'Authorization: Bearer KEY'", 401, code="invalid_api_key"
            )
        token = authorization[len("Bearer ") :].strip()
        if not token:
            raise APIError("invalid API key", 401, code="invalid_api_key")
        digest = hash_key(token)
        found = None
        for k in self.keys:  # compare with every key, in constant time, so timing tells nothing
            if hmac.compare_digest(k.sha256, digest):
                found = k
        if found is None:
            raise APIError("invalid API key", 401, code="invalid_api_key")
        return found

    def admit(self, key: Key | None, ask: Ask) -> None:
        """Check that the key may use the tier this request names (403 if not). Its loop cap goes to the
        engine as Compute.loop_cap, which also bounds what a tier or a budget picks."""
        if key is not None and key.tiers and ask.tier is not None and ask.tier not in key.tiers:
            raise APIError(
                f"this key may use the tiers {', '.join(key.tiers)}, not '{ask.tier}'", 403, param="compute"
            )

    def count(self, key: Key | None) -> None:
        """Count a request that passed every check against the key's rate (429 past rate_per_minute)."""
        if key is None or key.rate_per_minute is None:
            return
        now = self.clock()
        with self._lock:
            calls = self._calls[key.name]
            while calls and calls[0] <= now - 60:
                calls.popleft()
            if len(calls) >= key.rate_per_minute:
                raise APIError(
                    f"rate limit of {key.rate_per_minute} requests per minute reached for this key",
                    429,
                    code="rate_limit_exceeded",
                )
            calls.append(now)

    def cap(self, key: Key | None, max_request_loops: int) -> int:
        """The most loops this caller may run per token (a budget or a tier cannot go past it)."""
        if key is None:
            return max_request_loops
        return min(max_request_loops, key.loop_cap or max_request_loops)

    def compute(self, key: Key | None, ask: Ask, max_request_loops: int) -> Compute:
        """The compute `ask` runs with under this key: its cap as Compute.loop_cap, and a tier's loops held
        under the cap (a tier is a default; only loops the request asked for itself are refused above it)."""
        cap = self.cap(key, max_request_loops)
        compute = dataclasses.replace(ask.compute, loop_cap=cap)
        if compute.loops is not None and compute.loops > cap and "loops" not in ask.fields:
            compute = dataclasses.replace(compute, loops=cap)
        return compute
