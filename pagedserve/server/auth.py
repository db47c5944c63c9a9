"""Identities: API keys and the names they stand for, and the prefix-cache salt of each.

A key is a secret; its name is what logs and the cache salt use, so the key itself is never
written anywhere. With no key configured every request is ANONYMOUS and no key is asked for.
"""
from __future__ import annotations

import hmac
import json
import os
import stat
from dataclasses import dataclass

from pagedserve.server.protocol import OpenAIError

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Identities:
    keys: tuple[tuple[str, str], ...] = ()  # (key, name)

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def identify(self, authorization: str | None) -> str | None:
        """The identity of an `Authorization: Bearer KEY` header; None when it matches no key.

        Every configured key is compared, in constant time, so timing tells nothing about which
        key came close.
        """
        if not self.required:
            return ANONYMOUS
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


def load_identities(api_keys: list[str] | None = None, api_keys_file: str | None = None) -> Identities:
    """Keys given on the command line are named key-1, key-2, ... in order; the file names its own
    (several keys may share a name, e.g. while one is rotated)."""
    pairs = [(k, f"key-{i}") for i, k in enumerate(api_keys or [], 1)]
    if any(not k.strip() for k, _ in pairs):
        raise ValueError("--api-key must not be empty")
    pairs = [(k.strip(), n) for k, n in pairs]
    if api_keys_file:
        with open(api_keys_file, encoding="utf-8") as f:
            pairs += parse_keys_file(f.read(), api_keys_file)
        if not pairs:
            raise ValueError(f"{api_keys_file} holds no `name:key` line")
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):  # one name may have several keys (rotation), one key one name
        raise ValueError("the same API key is given more than once")
    return Identities(tuple(pairs))


def cache_salt(identity: str, request_salt: str | None, shared_prefix_cache: bool) -> str | None:
    """The engine's cache_salt for a request: its identity is mixed in unless the cache is shared,
    so one tenant can never get a cache hit (and its timing) on another tenant's prompt."""
    if shared_prefix_cache:
        return request_salt
    return json.dumps([identity, request_salt or ""])  # unambiguous: no name/salt pair forges another


class AuthMiddleware:
    """ASGI middleware: answers 401 to a request without a known key (except on open paths) and
    puts the caller's identity in the request state (and its audit record) for the handlers."""

    def __init__(self, app, identities: Identities, open_paths: tuple[str, ...] = ("/health",)) -> None:
        self.app = app
        self.identities = identities
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        name = self.identities.identify(header)
        if name is None and scope["path"] not in self.open_paths:
            error = OpenAIError(401, "a valid API key is required: send the header `Authorization: Bearer KEY`",
                                "authentication_error", code="invalid_api_key")
            return await error.send(send, ((b"www-authenticate", b"Bearer"),))
        state["identity"] = name
        if "audit" in state:
            state["audit"]["identity"] = name
        return await self.app(scope, receive, send)
