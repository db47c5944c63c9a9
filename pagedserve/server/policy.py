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

    [jwt]                               # signed, short-lived identities as well as keys
    public_keys = ["issuer.pem"]        # PEM (Ed25519 or RSA), relative to this file
    audience = "pagedserve"             # aud must name it; exp is required; nbf honoured
    issuer = "https://auth.example"     # optional: iss must match
    leeway_s = 30                       # clock skew allowed (at most 300)

A bearer JWT's `sub` names its identity (which must have a table here; `keys` may then be left out) and its
`scope` claim ("admin inference", or a list) can narrow, never widen, that identity's policy.

Static keys (`--api-key`, `--api-keys-file`) keep today's meaning: every such identity may do everything.
The file is validated at start; an unknown field, a wrong type or a key given twice is an error naming it.
"""
from __future__ import annotations

import dataclasses
import math
import os
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
    keys = table.get("keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and k.strip() for k in keys):
        raise ValueError(f"{where}: keys must be a list of non-empty strings")
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
        if field_name in _INTS and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10**12):
            raise ValueError(f"{where}: {field_name} must be a positive integer up to 10^12, got {value!r}")
        if field_name == "cache_group" and (not isinstance(value, str) or not value):
            raise ValueError(f"{where}: cache_group must be a non-empty string")
        values[field_name] = value
    return tuple(k.strip() for k in keys), Policy(**values)


@dataclass(frozen=True)
class JWTConfig:
    keys: tuple[object, ...]  # public keys (cryptography objects)
    audience: str
    issuer: str | None = None
    leeway_s: float = 30.0
    algorithms: tuple[str, ...] = ("EdDSA", "RS256")


def parse_jwt(table: dict, base_dir: str) -> JWTConfig:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    unknown = sorted(set(table) - {"public_keys", "audience", "issuer", "leeway_s"})
    if unknown:
        raise ValueError(f"[jwt]: unknown field(s) {', '.join(unknown)}")
    paths, audience = table.get("public_keys"), table.get("audience")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise ValueError("[jwt]: public_keys must be a non-empty list of PEM file paths")
    if not isinstance(audience, str) or not audience:
        raise ValueError("[jwt]: audience is required (tokens must be minted for this server)")
    issuer, leeway = table.get("issuer"), table.get("leeway_s", 30)
    if issuer is not None and not isinstance(issuer, str):
        raise ValueError("[jwt]: issuer must be a string")
    if isinstance(leeway, bool) or not isinstance(leeway, (int, float)) or not 0 <= leeway <= 300:
        raise ValueError(f"[jwt]: leeway_s must be between 0 and 300 seconds, got {leeway!r}")
    keys = []
    for p in paths:
        full = p if os.path.isabs(p) else os.path.join(base_dir, p)
        try:
            with open(full, "rb") as f:
                keys.append(load_pem_public_key(f.read()))
        except (OSError, ValueError) as e:
            raise ValueError(f"[jwt]: cannot read the public key {full}: {e}") from None
    return JWTConfig(tuple(keys), audience, issuer, float(leeway))


def load_auth_config(path: str) -> tuple[list[tuple[str, str]], dict[str, Policy], JWTConfig | None]:
    """The file's (key, identity) pairs, each identity's policy, and its [jwt] settings (None: no JWTs)."""
    with open(path, "rb") as f:
        try:
            doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(doc) - {"identities", "jwt"})
    if unknown or not isinstance(doc.get("identities"), dict) or not doc["identities"]:
        raise ValueError(f"{path}: expected [identities.NAME] tables (and a [jwt] table) and nothing else"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    jwt_config = parse_jwt(doc["jwt"], os.path.dirname(os.path.abspath(path))) if "jwt" in doc else None
    pairs, policies = [], {}
    for name, table in doc["identities"].items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: identities.{name} must be a table")
        keys, policies[name] = parse_policy(name, table)
        if not keys and jwt_config is None:
            raise ValueError(f"[identities.{name}]: keys must be a non-empty list (or configure [jwt])")
        pairs += [(k, name) for k in keys]
    return pairs, policies, jwt_config


def verify_jwt(token: str, config: JWTConfig) -> tuple[str, frozenset[str] | None] | None:
    """(sub, scopes or None when the token names none) of a token signed by one of the keys, for this audience,
    within its lifetime; None otherwise (expired, not yet valid, another audience or issuer, `alg: none`...)."""
    import jwt
    for key in config.keys:
        try:
            claims = jwt.decode(token, key, algorithms=list(config.algorithms), audience=config.audience,
                                issuer=config.issuer, leeway=config.leeway_s,
                                options={"require": ["exp", "sub", "aud"]})
        except (jwt.PyJWTError, TypeError, ValueError):  # TypeError: this key is not of the token's algorithm
            continue
        sub, scope = claims.get("sub"), claims.get("scope")
        if not isinstance(sub, str) or not sub:
            return None
        if scope is None:
            return sub, None
        scopes = scope.split() if isinstance(scope, str) else scope if isinstance(scope, list) else None
        return (sub, frozenset(map(str, scopes))) if scopes is not None else None
    return None


def narrow(policy: Policy, scopes: frozenset[str] | None) -> Policy:
    """A token's scopes can take away, never add: admin needs the policy's and the token's; without the
    `inference` scope no endpoint but the admin ones is left."""
    if scopes is None:
        return policy
    return dataclasses.replace(policy, admin=policy.admin and "admin" in scopes,
                               endpoints=policy.endpoints if "inference" in scopes else ())


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

    def reserve(self, name: str, per_minute: int, tokens: int) -> int | None:
        """Hold tokens for a request about to run: None if held (the bucket was not in debt), else the seconds
        to wait (nothing held). Held tokens are given back, less those used, by charge(used - held)."""
        wait = self.retry_after(name, per_minute)
        if wait is None:
            self.charge(name, per_minute, tokens)
        return wait
