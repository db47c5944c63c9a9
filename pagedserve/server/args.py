"""The server's own command-line options (the engine's are added by the CLI) and ServerConfig."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from pagedserve.server.auth import Identities, load_identities
from pagedserve.server.body_limit import DEFAULT_BODY_READ_TIMEOUT, DEFAULT_MAX_REQUEST_BYTES

DEFAULT_MAX_WAITING = 1024
DEFAULT_HEADER_READ_TIMEOUT = 10.0
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0  # uvicorn's
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_SHUTDOWN_TIMEOUT = 5.0


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    identities: Identities = field(default_factory=Identities)
    shared_prefix_cache: bool = False
    audit_log: str | None = None
    audit_key: bytes | None = None  # HMAC key of the audit log's head (--audit-key-file)
    anomaly_window_s: float = 60.0  # an identity's token rate is compared window by window ...
    anomaly_factor: float = 10.0    # ... and a window this many times its own baseline is audited
    max_waiting: int | None = DEFAULT_MAX_WAITING
    max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES
    served_model_names: tuple[str, ...] = ()  # empty: the engine's model name
    log_level: str = "info"
    header_read_timeout: float | None = DEFAULT_HEADER_READ_TIMEOUT  # None: no limit
    body_read_timeout: float | None = DEFAULT_BODY_READ_TIMEOUT
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    access_log: bool = False


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server options")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on")
    g.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="accept this bearer key (repeatable; the n-th is the identity key-n); "
                        "with any key set, every endpoint but /health needs one")
    g.add_argument("--api-keys-file", default=None, metavar="FILE",
                   help="file of `name:key` lines, one identity per line")
    g.add_argument("--auth-config", default=None, metavar="FILE",
                   help="identities with policies (TOML: keys, admin, models, endpoints, max_tokens, max_n, "
                        "max_concurrent, cache_group; see pagedserve/server/policy.py); static keys may do "
                        "everything, these only what their policy allows; /metrics and /version need admin")
    g.add_argument("--shared-prefix-cache", action="store_true",
                   help="one prefix cache for all identities (default: each identity has its own, so no "
                        "tenant can learn another's prompts through cache timing)")
    g.add_argument("--audit-log", default=None, metavar="FILE",
                   help="append one JSON line per request: time, identity, request id, endpoint, model, "
                        "tokens, cached tokens, finish reason, status, latency; hash-chained, with FILE.head "
                        "(`pagedserve audit verify FILE` finds an edited, missing or reordered line)")
    g.add_argument("--anomaly-window", type=float, default=60.0, metavar="SECONDS",
                   help="window in which each identity's tokens are counted against its own baseline (an "
                        "exponentially weighted mean of its earlier windows)")
    g.add_argument("--anomaly-factor", type=float, default=10.0,
                   help="a window whose tokens pass this many times the identity's baseline (and 1000) gets "
                        "an `anomaly` line in the audit log")
    g.add_argument("--audit-key-file", default=None, metavar="FILE",
                   help="a secret key (the file's bytes) that signs the audit log's head with an HMAC, so that "
                        "rewriting the whole log needs it; give the same file to `pagedserve audit verify`")
    g.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                   help="most requests queued but not running; more are refused with 503 (0: no limit)")
    g.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="largest request body accepted; larger ones are refused with 413 (0: no limit)")
    g.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="name clients use for the model (repeatable; default: the model's name)")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level")
    g.add_argument("--header-read-timeout", type=float, default=DEFAULT_HEADER_READ_TIMEOUT, metavar="SECONDS",
                   help="a request's headers must arrive within this time of its first byte (or of the "
                        "connection opening), else 408 and the connection is closed (0: no limit)")
    g.add_argument("--body-read-timeout", type=float, default=DEFAULT_BODY_READ_TIMEOUT, metavar="SECONDS",
                   help="a request's whole body must arrive within this time of its headers, else 408 "
                        "(0: no limit)")
    g.add_argument("--keep-alive-timeout", type=float, default=DEFAULT_KEEP_ALIVE_TIMEOUT, metavar="SECONDS",
                   help="close an idle kept-alive connection after this time")
    g.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help="most open connections; a request on one more is refused with 503 (0: no limit)")
    g.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT, metavar="SECONDS",
                   help="on SIGINT/SIGTERM, time the running requests get to finish before they are ended "
                        "with an error (new requests are refused at once)")
    access = g.add_mutually_exclusive_group()
    access.add_argument("--enable-uvicorn-access-log", dest="access_log", action="store_true", default=False,
                        help="log a line per response (method, path without the query string, status)")
    access.add_argument("--disable-uvicorn-access-log", dest="access_log", action="store_false",
                        help="no access log (the default)")


def server_config(args: argparse.Namespace) -> ServerConfig:
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    if args.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if not (args.anomaly_window > 0 and args.anomaly_factor > 1):
        raise ValueError(f"--anomaly-window must be > 0 and --anomaly-factor > 1, got {args.anomaly_window} and "
                         f"{args.anomaly_factor}")
    if args.max_request_bytes < 0:
        raise ValueError(f"--max-request-bytes must be >= 0, got {args.max_request_bytes}")
    for flag in ("header_read_timeout", "body_read_timeout", "keep_alive_timeout", "shutdown_timeout",
                 "max_connections"):
        if not 0 <= getattr(args, flag) < math.inf:  # NaN and inf too
            raise ValueError(f"--{flag.replace('_', '-')} must be a number >= 0, got {getattr(args, flag)}")
    return ServerConfig(
        host=args.host, port=args.port,
        identities=load_identities(args.api_key, args.api_keys_file, args.auth_config),
        shared_prefix_cache=args.shared_prefix_cache, audit_log=args.audit_log,
        audit_key=read_key_file(args.audit_key_file),
        anomaly_window_s=args.anomaly_window, anomaly_factor=args.anomaly_factor,
        max_waiting=args.max_waiting or None, max_request_bytes=args.max_request_bytes or None,
        served_model_names=tuple(args.served_model_name or ()),
        log_level=args.log_level,
        header_read_timeout=args.header_read_timeout or None, body_read_timeout=args.body_read_timeout or None,
        keep_alive_timeout=args.keep_alive_timeout, max_connections=args.max_connections or None,
        shutdown_timeout=args.shutdown_timeout, access_log=args.access_log)


def read_key_file(path: str | None) -> bytes | None:
    """The bytes of a key file (surrounding whitespace dropped); a ValueError if it is empty."""
    if path is None:
        return None
    with open(path, "rb") as f:
        key = f.read().strip()
    if not key:
        raise ValueError(f"the key file {path} is empty")
    return key
