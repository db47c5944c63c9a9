"""Policies per identity, from `--auth-config FILE` (TOML): what each identity may do, checked at every request.

    [identities.ops]
    keys = ["sk-ops-1"]
    admin = true                        # /metrics and /version (tenants get 403 there)

    [identities.acme]
    keys = ["sk-acme-1", "sk-acme-2"]   # several keys: one is being rotated
    models = ["SmolLM2-135M-Instruct"]  # default: every served model
    endpoints = ["/v1/chat/completions"]  # default: every endpoint but the admin ones
    max_tokens = 512                    # a request asking more gets 400; one asking none gets this many
    max_n = 4                           # samples, or beam width
    max_concurrent = 2                  # more requests in flight get 429
    tokens_per_minute = 20000           # prompt + completion tokens; spent: 429 with Retry-After
    cache_group = "acme"                # identities of one group share the prefix cache

Static keys (`--api-key`, `--api-keys-file`) keep today's meaning: every such identity may do everything.
The file is validated at start; an unknown field, a wrong type or a key given twice is an error naming it.
"""
from __future__ import annotations

import math
import time
import tomllib
from dataclasses import dataclass, fields
from typing import Callable

ADMIN_PATHS = ("/metrics", "/version")


@dataclass(frozen=True)
class Policy:
    admin: bool = False
    models: tuple[str, ...] | None = None     # None: every served model
    endpoints: tuple[str, ...] | None = None  # None: every endpoint but the admin ones
    max_tokens: int | None = None
    max_n: int | None = None
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None
    cache_group: str | None = None


FULL_ACCESS = Policy(admin=True)  # a static key's, or everyone's when no key is configured

_LISTS, _INTS = ("models", "endpoints"), ("max_tokens", "max_n", "max_concurrent", "tokens_per_minute")


def parse_policy(name: str, table: dict) -> tuple[tuple[str, ...], Policy]:
    """One [identities.NAME] table -> (its keys, its policy); ValueError naming the field at fault."""
    where = f"[identities.{name}]"
    known = {f.name for f in fields(Policy)} | {"keys"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    keys = table.get("keys")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k.strip() for k in keys):
        raise ValueError(f"{where}: keys must be a non-empty list of non-empty strings")
    values = {}
    for field_name, value in table.items():
        if field_name == "keys":
            continue
        if field_name == "admin" and not isinstance(value, bool):
            raise ValueError(f"{where}: admin must be true or false")
        if field_name in _LISTS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}: {field_name} must be a list of strings")
            value = tuple(value)
        if field_name in _INTS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: {field_name} must be a positive integer, got {value!r}")
        if field_name == "cache_group" and (not isinstance(value, str) or not value):
            raise ValueError(f"{where}: cache_group must be a non-empty string")
        values[field_name] = value
    return tuple(k.strip() for k in keys), Policy(**values)


def load_auth_config(path: str) -> tuple[list[tuple[str, str]], dict[str, Policy]]:
    """The file's (key, identity) pairs and each identity's policy."""
    with open(path, "rb") as f:
        try:
            doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(doc) - {"identities"})
    if unknown or not isinstance(doc.get("identities"), dict) or not doc["identities"]:
        raise ValueError(f"{path}: expected [identities.NAME] tables and nothing else"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    pairs, policies = [], {}
    for name, table in doc["identities"].items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: identities.{name} must be a table")
        keys, policies[name] = parse_policy(name, table)
        pairs += [(k, name) for k in keys]
    return pairs, policies


def endpoint_denial(policy: Policy, path: str) -> str | None:
    """Why this policy may not call this path (None: it may)."""
    if path in ADMIN_PATHS:
        return None if policy.admin else f"{path} needs the admin scope"
    if policy.endpoints is not None and path not in policy.endpoints:
        return f"this identity may not call {path}"
    return None


class TokenQuota:
    """A token bucket per identity: tokens_per_minute flow in evenly, up to one minute's worth. A request is let
    in while its identity's bucket is not in debt; its prompt and completion tokens are taken when it ends (so
    one request may overdraw, and the next waits until the debt is repaid). clock: injectable, for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._level: dict[str, tuple[float, float]] = {}  # identity -> (tokens, when)

    def _refill(self, name: str, per_minute: int) -> float:
        now = self.clock()
        level, then = self._level.get(name, (float(per_minute), now))
        level = min(float(per_minute), level + (now - then) * per_minute / 60)
        self._level[name] = (level, now)
        return level

    def retry_after(self, name: str, per_minute: int) -> int | None:
        """None if the identity may start a request now, else the whole seconds until it may."""
        level = self._refill(name, per_minute)
        return None if level > 0 else max(1, math.ceil((-level + 1) * 60 / per_minute))

    def charge(self, name: str, per_minute: int, tokens: int) -> None:
        level = self._refill(name, per_minute)
        self._level[name] = (level - tokens, self._level[name][1])
