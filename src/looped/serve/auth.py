"""API keys and per-key limits: keys are stored as SHA-256 digests, never as text, and never logged."""

from __future__ import annotations

import collections
import hashlib
import hmac
import threading
import time
from dataclasses import dataclass, field

from looped.config import ServeConfig
from looped.serve.protocol import APIError, Ask


def hash_key(key: str) -> str:
    """The digest to put in serve.keys[].sha256 for `key`."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Key:
    name: str
    sha256: str
    tiers: list[str] = field(default_factory=list)  # empty: every tier
    max_loops: int | None = None
    rate_per_minute: int | None = None


class Keyring:
    """Who may call, with which tiers and loops, and how often (a sliding one-minute window per key)."""

    def __init__(self, cfg: ServeConfig, clock=time.monotonic) -> None:
        self.keys = [Key(**k) for k in cfg.keys]
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
        digest = hash_key(authorization[len("Bearer ") :].strip())
        found = None
        for k in self.keys:  # compare with every key, in constant time, so timing tells nothing
            if hmac.compare_digest(k.sha256, digest):
                found = k
        if found is None:
            raise APIError("invalid API key", 401, code="invalid_api_key")
        return found

    def admit(self, key: Key | None, ask: Ask) -> None:
        """Check that the key may use the tier this request names (403 if not). Its loop cap goes to the
        engine as Compute.max_loops, which also bounds what a tier or a budget picks."""
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

    def cap(self, key: Key | None, max_loops: int) -> int:
        """The most loops this caller may run per token (a budget or a tier cannot go past it)."""
        return min(max_loops, key.max_loops or max_loops) if key is not None else max_loops
