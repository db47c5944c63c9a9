"""Policies per identity (`--auth-config`): each rule allows what it should and denies the rest with the right
status and an OpenAI-shaped error; the file is validated at start."""
import asyncio
import os

import httpx
import pytest

from pagedserve.server.args import ServerConfig
from pagedserve.server.auth import AuthMiddleware, load_identities
from pagedserve.server.policy import load_auth_config
from test_server import assert_error, running_server

CONFIG = """
[identities.ops]
keys = ["sk-ops"]
admin = true

[identities.acme]
keys = ["sk-acme", "sk-acme-next"]
endpoints = ["/v1/chat/completions", "/v1/models"]
max_tokens = 8
max_n = 2
cache_group = "shared-g"

[identities.globex]
keys = ["sk-globex"]
cache_group = "shared-g"

[identities.initech]
keys = ["sk-initech"]
models = ["some-other-model"]
"""


@pytest.fixture(scope="module")
def policy_server(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "auth.toml"
    path.write_text(CONFIG)
    config = ServerConfig(identities=load_identities(["sk-static"], None, str(path)))
    with running_server(tiny_model_dir, config) as (base, _):
        yield base, os.path.basename(tiny_model_dir)


def call(base, key, path, method="post", **body):
    return getattr(httpx, method)(f"{base}{path}", headers={"Authorization": f"Bearer {key}"},
                                  **({"json": body} if method == "post" else {}), timeout=60)


def chat(base, key, model, **extra):
    return call(base, key, "/v1/chat/completions", model=model, temperature=0,
                messages=[{"role": "user", "content": "A long shared system text. " * 8}], **extra)


def test_only_admins_read_metrics_and_version(policy_server):
    base, _ = policy_server
    for key in ("sk-ops", "sk-static"):  # a static key may do everything, as before
        assert call(base, key, "/metrics", "get").status_code == 200
        assert call(base, key, "/version", "get").status_code == 200
    for key in ("sk-acme", "sk-globex"):
        err = assert_error(call(base, key, "/metrics", "get"), 403, "admin")
        assert err["type"] == "permission_error" and err["code"] == "forbidden"
        assert_error(call(base, key, "/version", "get"), 403, "admin")
    assert httpx.get(f"{base}/health").status_code == 200  # open, as before


def test_endpoints_models_max_tokens_and_n(policy_server):
    base, model = policy_server
    assert_error(call(base, "sk-acme", "/v1/completions", prompt="hi", max_tokens=2), 403, "/v1/completions")
    assert call(base, "sk-acme", "/v1/models", "get").status_code == 200
    r = chat(base, "sk-acme", model, max_tokens=4, extra_body=None, ignore_eos=True)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    err = assert_error(chat(base, "sk-acme", model, max_tokens=9), 400, "at most 8")
    assert err["param"] == "max_tokens"
    r = chat(base, "sk-acme", model, ignore_eos=True)  # none asked: the ceiling
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    assert assert_error(chat(base, "sk-acme", model, max_tokens=2, n=3), 400, "at most 2")["param"] == "n"
    assert chat(base, "sk-acme", model, max_tokens=2, n=2).status_code == 200
    # the ceiling holds for beams, for min_tokens, and n counts every prompt's sequences
    r = chat(base, "sk-acme", model, use_beam_search=True, n=2, ignore_eos=True)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2 * 8
    assert assert_error(chat(base, "sk-acme", model, min_tokens=50), 400)["param"] == "max_tokens"
    acme_globex = call(base, "sk-globex", "/v1/completions", model=model, prompt=[[5, 6]] * 3, max_tokens=1)
    assert acme_globex.status_code == 200  # globex has no max_n
    err = assert_error(chat(base, "sk-initech", model, max_tokens=2), 403, "may not use the model")
    assert err["code"] == "model_not_allowed" and err["param"] == "model"
    assert_error(chat(base, "sk-initech", "no-such-model", max_tokens=2), 404)  # unknown stays 404
    r = chat(base, "sk-globex", model, max_tokens=40, n=4)
    assert r.status_code == 200, r.text  # no limits of its own


def test_no_api_description_for_tenants(policy_server):
    base, _ = policy_server
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert call(base, "sk-ops", path, "get").status_code == 404


def test_the_quota_holds_the_most_a_request_can_use_while_it_runs(tmp_path):
    """Two requests at once under a quota of 60 tokens a minute: the first holds its worst case (prompt and
    max_tokens), so the second is refused at once, not both let in to overdraw."""
    (tmp_path / "auth.toml").write_text('[identities.a]\nkeys = ["k"]\ntokens_per_minute = 60\n')
    from pagedserve.server.policy import TokenQuota
    from pagedserve.server.protocol import OpenAIError
    release = asyncio.Event()
    calls = [0]

    async def app(scope, receive, send):
        try:
            scope["state"]["reserve_tokens"](50)  # as _generate does: prompt + max_tokens x n
        except OpenAIError as e:
            return await e.send(send)
        calls[0] += 1
        if calls[0] == 1:  # the first one runs until released
            await release.wait()
        scope["state"]["usage"].update(prompt_tokens=10, completion_tokens=5)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    now = [0.0]
    mw = AuthMiddleware(app, load_identities(None, None, str(tmp_path / "auth.toml")),
                        quota=TokenQuota(clock=lambda: now[0]))

    async def main():
        first = asyncio.create_task(request(mw))
        await asyncio.sleep(0.01)
        second = await request(mw)  # 60 - 50 = 10 left: above zero, so it may hold its 50; it ends (uses 15)
        third = await request(mw)   # 10 - 50 + 50 - 15 = -5: in debt while the first still holds 50: refused
        release.set()
        return await first, second, third
    first, second, third = asyncio.run(main())
    assert first[0] == 200 and second[0] == 200 and third[0] == 429 and int(third[1][b"retry-after"]) >= 1
    # the first settled at what it used: 60 - 15 - 15 = 30 left, so the next one gets in
    assert asyncio.run(request(mw))[0] == 200


def test_a_cache_group_shares_the_prefix_cache_and_nobody_else(policy_server):
    base, model = policy_server
    messages = [{"role": "user", "content": "Group cache probe: the scheduler fills one budget. " * 6}]

    def cached(key):
        r = call(base, key, "/v1/chat/completions", model=model, max_tokens=1, messages=messages)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached("sk-acme") == 0
    assert cached("sk-globex") > 0     # the same group
    assert cached("sk-static") == 0    # its own cache
    assert cached("sk-acme-next") > 0  # another key of the same identity


async def request(mw, path="/v1/chat/completions"):
    """One request with the key `k` through an ASGI middleware: (status, headers) of its answer."""
    sent = []

    async def send(message):
        sent.append(message)
    await mw({"type": "http", "path": path, "headers": [(b"authorization", b"Bearer k")]}, None, send)
    return sent[0]["status"], dict(sent[0]["headers"])


def test_max_concurrent_answers_429_with_retry_after(tmp_path):
    (tmp_path / "auth.toml").write_text('[identities.a]\nkeys = ["k"]\nmax_concurrent = 1\n')
    identities = load_identities(None, None, str(tmp_path / "auth.toml"))
    release = asyncio.Event()

    async def app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        mw = AuthMiddleware(app, identities)
        first = asyncio.create_task(request(mw))
        await asyncio.sleep(0.01)
        second = await request(mw)  # the first is still in flight
        release.set()
        return await first, second, await request(mw)
    first, second, third = asyncio.run(main())
    assert first[0] == 200 and third[0] == 200
    assert second[0] == 429 and second[1][b"retry-after"] == b"1"


@pytest.mark.parametrize("text,message", [
    ('[identities.a]\nkeys = ["k"]\nmax_token = 3\n', "unknown field(s) max_token"),
    ('[identities.a]\nkeys = []\n', "keys must be a non-empty list (or configure [jwt])"),
    ('[identities.a]\nkeys = ["k"]\nmax_tokens = 0\n', "max_tokens must be a positive integer"),
    ('[identities.a]\nkeys = ["k"]\nadmin = "yes"\n', "admin must be true or false"),
    ('[identities.a]\nkeys = ["k"]\nmodels = "m"\n', "models must be a list of strings"),
    ('[tenants.a]\nkeys = ["k"]\n', "expected [identities.NAME] tables"),
    ('[identities.a\n', "not valid TOML"),
])
def test_auth_config_errors_name_the_field(tmp_path, text, message):
    path = tmp_path / "auth.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=None) as e:
        load_auth_config(str(path))
    assert message in str(e.value)


def test_auth_config_keys_are_unique_and_names_have_one_source(tmp_path):
    path = tmp_path / "auth.toml"
    path.write_text('[identities.a]\nkeys = ["k1"]\n[identities.b]\nkeys = ["k1"]\n')
    with pytest.raises(ValueError, match="more than once"):
        load_identities(None, None, str(path))
    path.write_text('[identities.key-1]\nkeys = ["k2"]\n')
    with pytest.raises(ValueError, match="also have static keys"):
        load_identities(["k1"], None, str(path))


def test_per_identity_counters_for_the_admin(policy_server):
    base, model = policy_server
    assert chat(base, "sk-globex", model, max_tokens=3, ignore_eos=True).status_code == 200
    assert call(base, "sk-globex", "/metrics", "get").status_code == 403
    text = call(base, "sk-ops", "/metrics", "get").text
    series = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("pagedserve:identity_"))
    assert float(series['pagedserve:identity_requests_total{identity="globex",outcome="ok"}']) >= 1
    assert float(series['pagedserve:identity_requests_total{identity="globex",outcome="denied"}']) >= 1
    assert float(series['pagedserve:identity_tokens_total{identity="globex",kind="completion"}']) >= 3


def test_token_quota_refills_over_time_with_an_injected_clock(tmp_path):
    from pagedserve.server.policy import TokenQuota
    now = [0.0]
    quota = TokenQuota(clock=lambda: now[0])
    assert quota.retry_after("a", 600) is None      # a full minute's worth to start with
    quota.charge("a", 600, 900)                     # one request overdraws by 300
    assert quota.retry_after("a", 600) == 31        # 10 tokens a second: 301 to be back above zero
    now[0] = 30.0
    assert quota.retry_after("a", 600) == 1
    now[0] = 31.0
    assert quota.retry_after("a", 600) is None
    now[0] = 1000.0
    quota.charge("a", 600, 600)                     # refilled only up to one minute's worth
    assert quota.retry_after("a", 600) is not None
    assert quota.retry_after("b", 600) is None      # buckets are per identity


def test_token_quota_through_the_middleware(tmp_path):
    (tmp_path / "auth.toml").write_text('[identities.a]\nkeys = ["k"]\ntokens_per_minute = 60\n')
    from pagedserve.server.policy import TokenQuota
    now = [0.0]
    mw_quota = TokenQuota(clock=lambda: now[0])

    async def app(scope, receive, send):
        scope["state"]["usage"].update(prompt_tokens=50, completion_tokens=30)  # as the handlers record it
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = AuthMiddleware(app, load_identities(None, None, str(tmp_path / "auth.toml")), quota=mw_quota)
    assert asyncio.run(request(mw))[0] == 200       # 80 tokens taken from 60: 20 in debt
    status, headers = asyncio.run(request(mw))
    assert status == 429 and headers[b"retry-after"] == b"21"
    now[0] = 21.0
    assert asyncio.run(request(mw))[0] == 200


# ---- signed, short-lived identities (JWT) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def jwt_setup(tmp_path_factory):
    """An auth config trusting one Ed25519 and one RSA issuer key; (identities, signing keys, config path)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    folder = tmp_path_factory.mktemp("jwt")
    ed, rs = ed25519.Ed25519PrivateKey.generate(), rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for name, key in (("ed.pem", ed), ("rsa.pem", rs)):
        (folder / name).write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (folder / "auth.toml").write_text(CONFIG.replace('[identities.initech]', '[identities.umbrella]\n'
                                                     '[identities.initech]')
                                      + '\n[jwt]\npublic_keys = ["ed.pem", "rsa.pem"]\naudience = "pagedserve"\n'
                                        'leeway_s = 5\n')
    return load_identities(None, None, str(folder / "auth.toml")), ed, rs, folder / "auth.toml"


def token(key, alg="EdDSA", sub="acme", aud="pagedserve", exp_in=60, nbf_in=None, **claims):
    import time

    import jwt
    now = int(time.time())
    body = {"sub": sub, "aud": aud, "exp": now + exp_in, **claims}
    if nbf_in is not None:
        body["nbf"] = now + nbf_in
    return jwt.encode(body, key, algorithm=alg)


def test_jwts_are_verified_and_their_identity_gets_its_policy(jwt_setup):
    identities, ed, rs, _ = jwt_setup

    def who(tok):
        found = identities.authenticate(f"Bearer {tok}")
        return found and found[0]
    assert who(token(ed)) == "acme" and who(token(rs, "RS256", sub="umbrella")) == "umbrella"
    assert identities.authenticate(f"Bearer {token(ed)}")[1].max_tokens == 8  # acme's policy
    assert who(token(ed, exp_in=-60)) is None                 # expired (beyond the 5 s leeway)
    assert who(token(ed, exp_in=-2)) == "acme"                 # within the leeway
    assert who(token(ed, nbf_in=60)) is None                   # not yet valid
    assert who(token(ed, aud="another-server")) is None        # another audience
    assert who(token(ed, sub="nobody")) is None                # no such identity configured
    from cryptography.hazmat.primitives.asymmetric import ed25519
    assert who(token(ed25519.Ed25519PrivateKey.generate())) is None  # a key nobody trusts
    import jwt
    unsigned = jwt.encode({"sub": "ops", "aud": "pagedserve", "exp": 2**40}, None, algorithm="none")
    assert who(unsigned) is None                               # alg: none
    hmac_token = jwt.encode({"sub": "ops", "aud": "pagedserve", "exp": 2**40}, "a-guessed-shared-secret-of-32-bytes!",
                            algorithm="HS256")
    assert who(hmac_token) is None                             # HMAC: not an algorithm this server takes
    assert who("a.b.c") is None                                # not a token at all
    no_exp = jwt.encode({"sub": "acme", "aud": "pagedserve"}, ed, algorithm="EdDSA")
    assert who(no_exp) is None                                 # exp is required
    assert identities.authenticate("Bearer sk-acme")[0] == "acme"  # keys still work beside JWTs


def test_a_token_narrows_never_widens(jwt_setup):
    identities, ed, _, _ = jwt_setup
    acme = identities.authenticate(f"Bearer {token(ed, scope='admin inference')}")[1]
    assert acme.admin is False  # acme's policy is not admin: the token cannot make it one
    ops = identities.authenticate(f"Bearer {token(ed, sub='ops', scope='inference')}")[1]
    assert ops.admin is False   # ops is admin, but this token leaves the scope out
    ops_full = identities.authenticate(f"Bearer {token(ed, sub='ops', scope=['admin', 'inference'])}")[1]
    assert ops_full.admin is True and ops_full.endpoints is None
    read_only = identities.authenticate(f"Bearer {token(ed, sub='ops', scope='admin')}")[1]
    assert read_only.endpoints == ()  # no inference scope: only the admin paths are left


def test_jwts_through_the_server(jwt_setup, tiny_model_dir):
    identities, ed, _, _ = jwt_setup
    with running_server(tiny_model_dir, ServerConfig(identities=identities)) as (base, _):
        model = os.path.basename(tiny_model_dir)
        assert chat(base, token(ed), model, max_tokens=2).status_code == 200
        assert_error(chat(base, token(ed, exp_in=-60), model, max_tokens=2), 401)
        assert call(base, token(ed, sub="ops", scope="admin"), "/metrics", "get").status_code == 200
        assert_error(call(base, token(ed, sub="ops", scope="inference"), "/metrics", "get"), 403, "admin")
        assert_error(chat(base, token(ed, sub="ops", scope="admin"), model, max_tokens=2), 403)


def test_revoking_an_identity_live_ends_its_requests_and_refuses_new_ones(tiny_model_dir, tmp_path):
    """An identity gone from --auth-config (on SIGHUP, or when the file changes) gets 401 on its next request,
    its streaming request is cut off at once, audited as identity_revoked; the others go on."""
    import json
    import time

    from pagedserve.async_engine import AsyncEngine
    from pagedserve.engine import LLMEngine
    from pagedserve.server.app import build_app
    from test_server import ENGINE, serve_in_thread
    auth = tmp_path / "auth.toml"
    auth.write_text('[identities.a]\nkeys = ["sk-a"]\n[identities.b]\nkeys = ["sk-b"]\n')
    audit = tmp_path / "audit.jsonl"
    config = ServerConfig(identities=load_identities(None, None, str(auth)), audit_log=str(audit))
    engine = AsyncEngine(LLMEngine(model=tiny_model_dir, **ENGINE))
    app = build_app(engine, config, reload_identities=lambda: load_identities(None, None, str(auth)),
                    watch=(str(auth),))
    server, thread, sock, base = serve_in_thread(app, config)
    model = os.path.basename(tiny_model_dir)
    try:
        body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True, "stream": True}
        chunks = 0
        with httpx.stream("POST", f"{base}/v1/completions", json=body, headers={"Authorization": "Bearer sk-b"},
                          timeout=60) as r:
            try:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks += 1
                        if chunks == 2:  # b is mid-answer: revoke it, as SIGHUP would
                            auth.write_text('[identities.a]\nkeys = ["sk-a"]\n')
                            app.state.loop.call_soon_threadsafe(app.state.reload)
            except httpx.HTTPError:
                pass  # the connection is closed under the stream
        assert chunks < 150  # cut off, not run to its 200 tokens
        assert_error(call(base, "sk-b", "/v1/completions", prompt="hi", max_tokens=1), 401)
        assert call(base, "sk-a", "/v1/completions", model=model, prompt="hi", max_tokens=1).status_code == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            records = [json.loads(x) for x in audit.read_text().splitlines()] if audit.exists() else []
            if len(records) >= 3:
                break
            time.sleep(0.05)
        revoked = [r for r in records if r["identity"] == "b" and r["endpoint"] == "/v1/completions"]
        assert revoked and revoked[0]["error"] == "identity_revoked" and revoked[0]["decision"] == "allowed"
        denied = [r for r in records if r["identity"] is None and r["endpoint"] == "/v1/completions"]
        assert denied and denied[0]["decision"] == "denied" and denied[0]["rule"] == "invalid_api_key"
        while engine.stats()["kv_blocks_used"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["num_requests_running"] == 0
        # The file is watched as well: a change takes effect within seconds, with no signal.
        auth.write_text('[identities.c]\nkeys = ["sk-c"]\n')
        deadline = time.monotonic() + 10
        while call(base, "sk-a", "/v1/models", "get").status_code != 401 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert call(base, "sk-a", "/v1/models", "get").status_code == 401
        assert call(base, "sk-c", "/v1/models", "get").status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
