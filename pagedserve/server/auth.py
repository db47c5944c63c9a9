"""Identities: API keys and the names they stand for, each name's policy (policy.py), and the prefix-cache
salt of each.

A key is a secret; its name is what logs and the cache salt use, so the key itself is never
written anywhere. With no key configured every request is ANONYMOUS and no key is asked for.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import stat
from dataclasses import dataclass
from typing import Callable

from pagedserve.server.policy import (FULL_ACCESS, JWTConfig, Policy, TokenQuota, endpoint_denial, load_auth_config,
                                      narrow, verify_jwt)
from pagedserve.server.errors import OpenAIError

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Identities:
    keys: tuple[tuple[str, str], ...] = ()  # (key, name)
    policies: tuple[tuple[str, Policy], ...] = ()  # (name, policy) of --auth-config's identities
    jwt: JWTConfig | None = None  # signed identities, as well as the keys

    @property
    def required(self) -> bool:
        return bool(self.keys) or self.jwt is not None

    def authenticate(self, authorization: str | None) -> tuple[str, Policy] | None:
        """The identity of an `Authorization: Bearer ...` header (a key, or a JWT naming a configured identity)
        and what it may do now; None when it is neither."""
        name = self.identify(authorization)
        if name is not None:
            return name, self.policy(name)
        if self.jwt is None:
            return None
        token = (authorization or "").strip().partition(" ")[2].strip()
        verified = verify_jwt(token, self.jwt) if token.count(".") == 2 else None
        if verified is None or verified[0] not in dict(self.policies):
            return None
        return verified[0], narrow(self.policy(verified[0]), verified[1])

    def policy(self, name: str) -> Policy:
        """What an identity may do: its --auth-config policy; a static key's (or no key's) may do everything."""
        return next((p for n, p in self.policies if n == name), FULL_ACCESS)

    def identify(self, authorization: str | None) -> str | None:
        """The identity of an `Authorization: Bearer KEY` header; None when it matches no key.

        Every configured key is compared, in constant time, so timing tells nothing about which
        key came close.
        """
        if not self.required:
            return ANONYMOUS
        if not self.keys:
            return None
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        given = token.strip().encode()
        found = None
        for key, name in self.keys:
            if hmac.compare_digest(given, key.encode()) and found is None:
                found = name
        return found


def parse_keys_file(text: str, source: str = "keys file") -> list[tuple[str, str]]:
    """`name:key` per line -> [(key, name)]; blank lines and lines starting with # are skipped."""
    pairs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition(":")
        name, key = name.strip(), key.strip()
        if not sep or not name or not key:
            raise ValueError(f"{source} line {lineno}: expected `name:key`")  # the line may hold a key: not shown
        pairs.append((key, name))
    return pairs


def keys_file_warning(path: str | None) -> str | None:
    """A warning when the keys file can be read by users other than its owner (group or others)."""
    if not path:
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    who = [name for bit, name in ((stat.S_IRGRP, "its group"), (stat.S_IROTH, "other users")) if mode & bit]
    if not who:
        return None
    return (f"the API keys file {path} is readable by {' and '.join(who)} (mode {stat.S_IMODE(mode):04o}); "
            f"make it private: chmod 600 {path}")


def load_identities(api_keys: list[str] | None = None, api_keys_file: str | None = None,
                    auth_config: str | None = None) -> Identities:
    """Keys given on the command line are named key-1, key-2, ... in order; the file names its own
    (several keys may share a name, e.g. while one is rotated); --auth-config's identities bring policies."""
    pairs = [(k, f"key-{i}") for i, k in enumerate(api_keys or [], 1)]
    if any(not k.strip() for k, _ in pairs):
        raise ValueError("--api-key must not be empty")
    pairs = [(k.strip(), n) for k, n in pairs]
    if api_keys_file:
        with open(api_keys_file, encoding="utf-8") as f:
            pairs += parse_keys_file(f.read(), api_keys_file)
        if not pairs:
            raise ValueError(f"{api_keys_file} holds no `name:key` line")
    policies: dict[str, Policy] = {}
    jwt_config = None
    if auth_config:
        config_pairs, policies, jwt_config = load_auth_config(auth_config)
        clash = sorted({n for _, n in pairs} & set(policies))
        if clash:
            raise ValueError(f"{auth_config}: identities {', '.join(clash)} also have static keys (--api-key, "
                             "--api-keys-file), which may do everything: give each name one source")
        pairs += config_pairs
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):  # one name may have several keys (rotation), one key one name
        raise ValueError("the same API key is given more than once")
    return Identities(tuple(pairs), tuple(policies.items()), jwt_config)


logger = logging.getLogger(__name__)


class IdentityStore:
    """The identities in force, replaceable while the server runs (SIGHUP), and the requests each is answering,
    so that revoking an identity ends them at once."""

    def __init__(self, identities: Identities) -> None:
        self.identities = identities
        self.running: dict[str, set[asyncio.Task]] = {}
        self.revoked_tasks: set[asyncio.Task] = set()

    def names(self) -> set[str]:
        ids = self.identities
        return {n for _, n in ids.keys} | {n for n, _ in ids.policies} | ({ANONYMOUS} if not ids.required else set())

    def replace(self, identities: Identities) -> list[str]:
        """Put new identities in force; those no longer there are revoked: their running requests are cancelled
        (their audit lines say identity_revoked). Returns the revoked names."""
        before = self.names()
        self.identities = identities
        revoked = sorted(before - self.names())
        for name in revoked:
            for task in self.running.get(name, ()):
                self.revoked_tasks.add(task)
                task.cancel()
        return revoked


def cache_salt(identity: str, request_salt: str | None, shared_prefix_cache: bool,
               cache_group: str | None = None) -> str | None:
    """The engine's cache_salt for a request: its identity (or its policy's cache group) is mixed in unless
    the cache is shared, so one tenant can never get a cache hit (and its timing) on another tenant's prompt."""
    if shared_prefix_cache:
        return request_salt
    if cache_group is not None:
        return json.dumps(["group", cache_group, request_salt or ""])  # three items: never an identity's two
    return json.dumps([identity, request_salt or ""])  # unambiguous: no name/salt pair forges another


class AuthMiddleware:
    """ASGI middleware: answers 401 to a request without a known key (except on open paths), 403 to one its
    identity's policy does not allow on this path, 429 to one over its policy's concurrent requests; puts the
    caller's identity and policy in the request state (and the identity in its audit record)."""

    def __init__(self, app, identities: Identities | IdentityStore, open_paths: tuple[str, ...] = ("/health",),
                 quota: TokenQuota | None = None, on_done: Callable[[str, int, dict], None] | None = None) -> None:
        """identities: fixed, or a store that SIGHUP may change. on_done(identity, status, usage): called as each
        identified request ends (the per-identity metrics)."""
        self.app = app
        self.store = identities if isinstance(identities, IdentityStore) else IdentityStore(identities)
        self.open_paths = open_paths
        self.quota = quota or TokenQuota()
        self.on_done = on_done

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        found = self.store.identities.authenticate(header)
        name, policy = found if found is not None else (None, None)
        if name is None and scope["path"] not in self.open_paths:
            error = OpenAIError(401, "a valid API key is required: send the header `Authorization: Bearer KEY`",
                                "authentication_error", code="invalid_api_key")
            return await error.send(send, ((b"www-authenticate", b"Bearer"),))
        state["identity"] = name
        if "audit" in state:
            state["audit"]["identity"] = name
        if scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        state["policy"] = policy
        usage = state["usage"] = {"prompt_tokens": 0, "completion_tokens": 0}  # filled in by the handlers
        held = [0]  # tokens the request reserved from the quota (the handlers call reserve_tokens)
        status = [500]
        if policy.tokens_per_minute is not None:
            def reserve_tokens(tokens: int) -> None:
                wait = self.quota.reserve(name, policy.tokens_per_minute, tokens)
                if wait is not None:
                    raise _quota_spent(policy, wait)
                held[0] += tokens
            state["reserve_tokens"] = reserve_tokens

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            refusal = self._refusal(name, policy, scope["path"])
            if refusal is not None:
                return await refusal.send(send_and_note)
            task = asyncio.current_task()
            self.store.running.setdefault(name, set()).add(task)
            try:
                return await self.app(scope, receive, send_and_note)
            except asyncio.CancelledError:
                if task in self.store.revoked_tasks and "audit" in state:
                    state["audit"]["error"] = "identity_revoked"
                raise
            finally:
                self.store.running[name].discard(task)
                self.store.revoked_tasks.discard(task)
                if policy.tokens_per_minute is not None:  # what it used, less what it held
                    self.quota.charge(name, policy.tokens_per_minute,
                                      usage["prompt_tokens"] + usage["completion_tokens"] - held[0])
        finally:
            if self.on_done is not None:
                try:
                    self.on_done(name, status[0], usage)
                except Exception:  # counters must never fail a request
                    logger.exception("per-identity accounting failed")

    def _refusal(self, name: str, policy: Policy, path: str) -> OpenAIError | None:
        """What the policy says to this request before it runs: the error to answer, or None."""
        denial = endpoint_denial(policy, path)
        if denial is not None:
            return OpenAIError(403, denial, "permission_error", code="forbidden")
        if policy.max_concurrent is not None and len(self.store.running.get(name, ())) >= policy.max_concurrent:
            return OpenAIError(429, f"this identity may have {policy.max_concurrent} requests in flight; wait for "
                                    "one to finish", "rate_limit_error", code="concurrency_limit_exceeded",
                               headers=((b"retry-after", b"1"),))
        if policy.tokens_per_minute is not None:
            wait = self.quota.retry_after(name, policy.tokens_per_minute)
            if wait is not None:
                return _quota_spent(policy, wait)
        return None


def _quota_spent(policy: Policy, wait: int) -> OpenAIError:
    """The 429 of an identity whose token quota is spent (Retry-After: its wait, in whole seconds)."""
    return OpenAIError(429, f"this identity's {policy.tokens_per_minute} tokens a minute are spent; retry in "
                            f"{wait} s", "rate_limit_error", code="token_quota_exceeded",
                       headers=((b"retry-after", str(wait).encode()),))
