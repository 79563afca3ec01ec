"""CORS at the proxy (`server.cors_origins`, `proxy.cors`), in front of the scripted
upstream, which answers CORS for any origin as vLLM's server does when started with
`--allowed-origins '["*"]'` (vLLM 0.32 allows none by default)."""

from __future__ import annotations

import httpx
import pytest

from policies.config import parse_config
from policies.errors import ConfigError
from tests.proxy.test_serve import Serve, config_text, eventually
from tests.support.proxy import running_proxy, unguarded_yaml

APP = "https://app.example.com"
PREFLIGHT = {"origin": APP, "access-control-request-method": "POST",
             "access-control-request-headers": "authorization, content-type, x-stainless-os"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def keyed(base_url: str, origins: str = "") -> str:
    server = "  api_keys: [sk-proxy]" + (f"\n  cors_origins: {origins}" if origins else "")
    return unguarded_yaml(base_url, server=server)


def test_without_cors_origins_a_preflight_is_forwarded_and_a_keyed_proxy_refuses_it(scripted):
    """The default: the proxy does no CORS. The upstream's policy applies, and a
    preflight, which carries no key, meets a keyed proxy's 401."""
    with running_proxy(unguarded_yaml(scripted[0])) as proxy:
        reply = httpx.options(proxy.url + "/v1/chat/completions", headers=PREFLIGHT)
        assert reply.status_code == 200 and reply.text == "OK"  # the upstream's own answer
        assert reply.headers["access-control-allow-origin"] == "*"
    with running_proxy(keyed(scripted[0])) as proxy:
        reply = httpx.options(proxy.url + "/v1/chat/completions", headers=PREFLIGHT)
        assert reply.status_code == 401


def test_a_listed_origin_is_answered_by_the_proxy_before_keys(scripted):
    """A preflight from a listed origin: 204 from the proxy itself (the upstream's would be
    200 "OK"), before the key check, with what it asked for allowed."""
    with running_proxy(keyed(scripted[0], f"['{APP}']")) as proxy:
        reply = httpx.options(proxy.url + "/v1/chat/completions", headers=PREFLIGHT)
        assert reply.status_code == 204, reply.text
        assert reply.headers["access-control-allow-origin"] == APP
        assert reply.headers["access-control-allow-headers"] == PREFLIGHT["access-control-request-headers"]
        assert "POST" in reply.headers["access-control-allow-methods"]
        assert reply.headers["access-control-max-age"] == "600"
        assert "Origin" in reply.headers["vary"]
        # An origin off the list: 403 in the envelope, and still never forwarded.
        reply = httpx.options(proxy.url + "/v1/chat/completions", headers={**PREFLIGHT, "origin": "https://evil.example"})
        assert reply.status_code == 403
        assert reply.json()["error"]["code"] == "cors_origin_not_allowed"
        assert "access-control-allow-origin" not in reply.headers
        # An OPTIONS that is no preflight (no Access-Control-Request-Method) is a request as any.
        assert httpx.options(proxy.url + "/v1/models", headers={"origin": APP}).status_code == 401


def test_answers_to_a_listed_origin_carry_its_header_and_never_the_upstreams(scripted):
    """The upstream's `Access-Control-Allow-Origin: *` would let any page read the answer:
    it is dropped, and a listed origin gets its own, on errors too; an unlisted origin gets
    none, so its page cannot read the answer."""
    key = {"authorization": "Bearer sk-proxy"}
    with running_proxy(keyed(scripted[0], f"['{APP.upper()}']")) as proxy:
        with httpx.Client(base_url=proxy.url) as client:
            reply = client.post("/v1/chat/completions", json=CHAT, headers={**key, "origin": APP})
            assert reply.status_code == 200, reply.text
            assert reply.headers.get_list("access-control-allow-origin") == [APP]
            assert reply.headers["access-control-expose-headers"] == "*"
            assert "Origin" in reply.headers["vary"]
            # A stream, too: the headers come with its first message.
            with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                               headers={**key, "origin": APP}) as stream:
                assert stream.headers.get_list("access-control-allow-origin") == [APP]
                assert "[DONE]" in stream.read().decode()
            # The proxy's own errors, so the page can read why.
            reply = client.post("/v1/chat/completions", json=CHAT, headers={"origin": APP})
            assert reply.status_code == 401 and reply.headers["access-control-allow-origin"] == APP
            reply = client.post("/v1/chat/completions", json=CHAT, headers={**key, "origin": "https://evil.example"})
            assert reply.status_code == 200
            assert not any(name.startswith("access-control-") for name in reply.headers)
            # A client that sends no Origin (any SDK outside a browser) gets no CORS headers either.
            reply = client.post("/v1/chat/completions", json=CHAT, headers=key)
            assert not any(name.startswith("access-control-") for name in reply.headers)


def test_a_star_allows_every_origin(scripted):
    with running_proxy(keyed(scripted[0], "['*']")) as proxy:
        reply = httpx.options(proxy.url + "/v1/chat/completions", headers={**PREFLIGHT, "origin": "https://any.example"})
        assert reply.status_code == 204 and reply.headers["access-control-allow-origin"] == "*"
        reply = httpx.get(proxy.url + "/v1/models", headers={"origin": "https://any.example",
                                                             "authorization": "Bearer sk-proxy"})
        assert reply.headers.get_list("access-control-allow-origin") == ["*"]


@pytest.mark.parametrize("origins, reason", [
    ("['https://app.example.com/']", "no path"),
    ("['app.example.com']", "scheme://host"),
    ("['https://user@app.example.com']", "scheme://host"),
    ("[3]", "expected a string"),
    ("https://app.example.com", "expected a list"),
])
def test_an_origin_no_browser_sends_is_refused_at_load(origins, reason):
    """A listed origin with a path or a trailing "/" never matches what a browser sends."""
    with pytest.raises(ConfigError, match=reason) as caught:
        parse_config(keyed("http://127.0.0.1:9/v1", origins))
    assert "server.cors_origins" in str(caught.value)


def test_a_reload_changes_the_list(tmp_path, scripted):
    """`serve` reads `server.cors_origins` on every request: listed after a reload, an
    origin's preflight is answered at once, no restart."""
    path = tmp_path / "config.yaml"
    path.write_text(config_text(scripted[0]))
    with Serve(path) as serve:
        assert httpx.options(serve.url + "/v1/chat/completions", headers=PREFLIGHT).text == "OK"  # forwarded
        path.write_text(f"server: {{cors_origins: ['{APP}']}}\n" + config_text(scripted[0]))
        eventually(lambda: httpx.options(serve.url + "/v1/chat/completions", headers=PREFLIGHT).status_code == 204)
