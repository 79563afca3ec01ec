"""Fuzzing the front door: whatever a client sends, the proxy answers in kind and stays up.

Two live proxies (a guarded policy with `KeywordScorer`, and an unguarded one) sit in
front of the scripted upstream, wrapped in `PathLog` so every path that reaches it is
recorded. Requests are written byte for byte (`rawhttp.exchange`), since httpx would
normalise the very paths and headers under test. For every generated request:

- no 500 from the proxy (the upstream's own answers, marked by `PathLog`, pass through
  unchanged), and a 502/503/504 only with a documented `code` (the README's error table);
- when the proxy answers without calling the upstream and the status is an error, the
  body is the OpenAI envelope `{"error": {"message", "type", "param", "code"}}` (under
  `/v1/messages`, Anthropic's `{"type": "error", "error": {"type", "message"}}`) with a
  documented status/code pair (uvicorn's own "Invalid HTTP request received." for bytes
  that are not HTTP at all is the one exception, and it never reaches the upstream);
- in-band errors in a 200 stream carry a documented code;
- every path the upstream receives is the path the client sent, and stays under `/v1`
  after percent-decoding and dot-segment removal;
- a plain request right after still works.

Sizes are set so the whole module runs in about 30 s on two busy cores; the README
("Fuzzing") reports the case count.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import time
import tracemalloc
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from policies.config import route_rest
from policies.routing import normalize_path
from proxy.errors import anthropic_path
from tests.proxy.rawhttp import PathLog, Reply, exchange
from tests.support.proxy import running_proxy
from tests.support.scorers import KeywordScorer
from tests.support.servers import LiveServer
from tests.support.upstream import Recorder, build_upstream

LIMIT = 65536  # server.max_body_bytes of both proxies

# status -> the `code` values the proxy may answer with (README "Errors").
DOCUMENTED = {
    400: {None, "content_filter", "unsupported_input", "prompt_too_long"},
    401: {"invalid_api_key"},
    403: {"unguarded_endpoint"},
    404: {"not_found"},
    405: {None, "method_not_allowed"},  # not in the README's table yet: a method no route serves
    413: {"request_too_large"},
    502: {"upstream_unreachable", "bad_upstream_reply"},
    503: {"overloaded", "guard_unavailable"},
    504: {"upstream_timeout", "request_timeout"},
}
IN_BAND = {"upstream_unreachable", "guard_unavailable", "request_timeout", "overloaded"}
UVICORN_400 = b"Invalid HTTP request received."


def proxy_yaml(base_url: str, *, guarded: bool) -> str:
    policy = ("prompt: {action: refuse, threshold: 0.5}\n"
              "    response: {action: cut, threshold: 0.5, check_every: 2, holdback: 2}\n"
              "    moderations: guard") if guarded else (
              "prompt: {action: off}\n    response: {action: off}")
    return f"""
server:
  max_body_bytes: {LIMIT}
upstreams:
  up: {{base_url: {base_url}, read_timeout: 10}}
policies:
  p:
    {policy}
routes:
  - {{prefix: /v1, upstream: up, policy: p}}
"""


class Stack:
    def __init__(self, upstream: PathLog, recorder: Recorder, proxies: dict[str, LiveServer]) -> None:
        self.upstream, self.recorder, self.proxies = upstream, recorder, proxies
        self.cases = 0


@pytest.fixture(scope="module")
def stack():
    recorder = Recorder()
    upstream = PathLog(build_upstream(recorder))
    with contextlib.ExitStack() as stack:
        up = stack.enter_context(LiveServer(upstream))
        proxies = {name: stack.enter_context(running_proxy(proxy_yaml(up.url + "/v1", guarded=name == "guarded"),
                                                           KeywordScorer()))
                   for name in ("guarded", "unguarded")}
        state = Stack(upstream, recorder, proxies)
        yield state
        # Recorder's own paths too: every chat/completions/responses request it parsed.
        assert all(r["path"].startswith("/v1/") for r in recorder.requests)
        print(f"\nfuzz cases run: {state.cases}")


def is_envelope(body: object, *, anthropic: bool = False) -> bool:
    if anthropic:  # Anthropic's, with the proxy's `code` when it has one
        error = body.get("error") if isinstance(body, dict) and set(body) == {"type", "error"} else None
        return (body["type"] == "error" and isinstance(error, dict) and set(error) <= {"type", "message", "code"}
                and isinstance(error.get("message"), str) and isinstance(error.get("type"), str))
    if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)):
        return False
    error = body["error"]
    return (set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
            and isinstance(error["type"], str) and (error["code"] is None or isinstance(error["code"], str)))


def stays_under_base(raw_path: bytes) -> bool:
    """What an upstream that decodes and normalises the path would serve stays under /v1
    (the route's prefix, which matches each segment in any case and without matrix
    parameters: `/V1;x/` is under it, and forwarded as the base URL's `/`)."""
    decoded = unquote(raw_path.decode("latin-1"))
    if "\\" in decoded:
        return False
    normal = "/".join(s.split(";", 1)[0].lower() for s in posixpath.normpath(decoded).split("/"))
    return normal == "/v1" or normal.startswith("/v1/")


def path_of(target: bytes) -> bytes:
    """The path part of a request target (origin or absolute form)."""
    if target.lower().startswith((b"http://", b"https://")):
        target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
    return target.split(b"?", 1)[0].split(b"#", 1)[0]


def sse_errors(body: bytes) -> list[dict]:
    errors = []
    for block in body.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: {"):
                try:
                    data = json.loads(line[6:])
                except ValueError:
                    continue
                if isinstance(data, dict) and "error" in data:
                    errors.append(data["error"])
    return errors


def check(stack: Stack, proxy: str, method: bytes, target: bytes, headers=(), body: bytes = b"",
          *, http_valid: bool = True) -> tuple[Reply, bool]:
    """Sends one request, checks every invariant; returns the reply and whether the upstream saw it."""
    before = len(stack.upstream.paths)
    reply = exchange(stack.proxies[proxy].port, method, target, headers, body)
    stack.cases += 1
    seen = stack.upstream.paths[before:]
    context = f"{proxy} {method!r} {target[:200]!r} -> {reply.status} {reply.body[:300]!r}"
    if reply.headers.get("x-upstream") == "1":  # the upstream's own answer, passed through
        assert seen, context
        if reply.status >= 500:
            # The scripted upstream crashed (e.g. NaN in `model`) and uvicorn closes that
            # connection just after the 500; give the FIN time to reach the proxy's pool,
            # or the follow-up may be written into the dying connection (a 502).
            time.sleep(0.2)
        follow_up(stack, proxy)
        return reply, True
    assert reply.status != 500, context
    assert reply.status < 500 or reply.status in (502, 503, 504), context
    # Escaped letters, digits and `-_~` arrive decoded (`policies.routing.normalize_path`),
    # and the route's prefix (matched in any case, without `;params`) is the base URL's `/v1`.
    sent = normalize_path(path_of(target).decode("latin-1"))
    rest = route_rest("/v1", sent)
    sent_path = (sent if rest is None else "/v1" + rest).encode("latin-1")
    for path in seen:
        assert path == sent_path, f"{context}: the upstream saw {path[:200]!r}"
        assert path == b"/v1" or path.startswith(b"/v1/"), context
        assert stays_under_base(path), f"{context}: the upstream saw {path[:200]!r}"
    if reply.status >= 500 or (not seen and reply.status >= 400):
        if not http_valid and reply.status == 400 and reply.body == UVICORN_400:
            assert not seen, context
        else:
            assert reply.content_type.startswith("application/json"), context
            error = json.loads(reply.body)
            assert is_envelope(error, anthropic=anthropic_path(sent_path.decode("latin-1"))), context
            assert error["error"].get("code") in DOCUMENTED.get(reply.status, ()), context
    if reply.status == 200 and reply.content_type.startswith("text/event-stream"):
        for error in sse_errors(reply.body):
            assert error.get("code") in IN_BAND, context
    follow_up(stack, proxy)
    return reply, bool(seen)


def follow_up(stack: Stack, proxy: str) -> None:
    reply = exchange(stack.proxies[proxy].port, b"POST", b"/v1/chat/completions",
                     [(b"content-type", b"application/json"), (b"x-script", b"text:still here")],
                     json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert reply.status == 200 and json.loads(reply.body)["choices"][0]["message"]["content"] == "still here"


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
PROXIES = pytest.mark.parametrize("proxy", ["guarded", "unguarded"])

# -- bodies: wrong types in every field ---------------------------------------------------

leaf = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
        | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
junk = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
special = st.sampled_from(["yes", "true", 1, 0, -1, 2 ** 63, 10 ** 30, "2", 1.5, [], {}, None, "", "BOMB",
                           [{"role": "user", "content": "BOMB"}], [{"role": 7}], [[[]]], {"content": {}},
                           [{"type": "text", "text": 5}], [{"type": "image_url"}], "\x00\ud7ff\U0010ffff"])
value = special | junk
small_n = st.sampled_from(["yes", "2", 1.5, [], {}, None, True, False]) | st.integers(-3, 130)

BASES = {
    "chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hello"}]},
    "completions": {"model": "m", "prompt": "hello"},
    "responses": {"model": "m", "input": "hello"},
    "messages": {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]},
    "chat/completions/batch": {"model": "m", "messages": [[{"role": "user", "content": "hello"}],
                                                          [{"role": "user", "content": "hi"}]]},
    "moderations": {"model": "m", "input": ["hello", "a BOMB"]},  # the guarded proxy answers it itself
}
COMMON = ["model", "stream", "stream_options", "n", "max_tokens", "temperature", "extra_field", "user", "tools"]
FIELDS = {
    "chat/completions": COMMON + ["messages", "messages.0", "messages.0.content", "messages.0.role",
                                  "messages.0.content.0", "messages.0.content.0.text", "messages.1"],
    "completions": COMMON + ["prompt", "prompt.0", "echo", "logprobs", "suffix"],
    "responses": COMMON + ["input", "input.0", "input.0.content", "input.0.content.0", "instructions"],
    "messages": COMMON + ["messages", "messages.0", "messages.0.content", "messages.0.role", "messages.0.content.0",
                          "messages.0.content.0.type", "messages.0.content.0.content", "system", "system.0"],
    "chat/completions/batch": COMMON + ["messages", "messages.0", "messages.1", "messages.0.0", "messages.1.0.role",
                                        "messages.1.0.content", "messages.1.0.content.0", "messages.2"],
    "moderations": ["model", "input", "input.0", "input.1", "input.0.type", "input.0.text", "extra_field"],
}


def mutate(body, path: str, new):
    """`body` with the value at dotted `path` replaced (lists and dicts made on the way)."""
    head, _, rest = path.partition(".")
    if isinstance(body, list) and head.isdigit():
        body = list(body)
        index = int(head)
        while len(body) <= index:
            body.append({"role": "user", "content": "x"} if not rest else {})
        body[index] = mutate(body[index], rest, new) if rest else new
        return body
    body = dict(body) if isinstance(body, dict) else {}
    if rest:
        inner = body.get(head)
        if not isinstance(inner, (list, dict)):
            inner = [] if rest.split(".", 1)[0].isdigit() else {}
        body[head] = mutate(inner, rest, new)
    else:
        body[head] = new
    return body


@st.composite
def bad_bodies(draw):
    endpoint = draw(st.sampled_from(sorted(BASES)))
    body = dict(BASES[endpoint], stream=draw(st.booleans()))
    for field in draw(st.lists(st.sampled_from(FIELDS[endpoint]), min_size=1, max_size=3, unique=True)):
        # A huge `n` on a guarded stream costs memory per choice: test_huge_n_... covers it
        # with a bounded size, so the fuzz cannot exhaust the shared machine.
        body = mutate(body, field, draw(small_n if field == "n" else value))
    script = draw(st.sampled_from([b"text:one two three four", b"text:one two BOMB three four five"]))
    return endpoint, body, script


@PROXIES
@FUZZ
@given(case=bad_bodies())
def test_wrong_types_in_every_field(stack, proxy, case):
    endpoint, body, script = case
    data = json.dumps(body).encode()
    reply, seen = check(stack, proxy, b"POST", b"/v1/" + endpoint.encode(),
                        [(b"content-type", b"application/json"), (b"x-script", script)], data)
    if reply.status == 400 and not seen:
        assert json.loads(reply.body)["error"]["type"] == "invalid_request_error"


# -- bodies: bytes that are not a JSON object, and sizes around the limit ----------------

def nested(depth: int, kind: str) -> bytes:
    return (b"[" * depth + b"]" * depth) if kind == "list" else (b'{"a":' * depth + b"1" + b"}" * depth)


def sized(size: int) -> bytes:
    """A valid chat body of exactly `size` bytes."""
    shell = json.dumps({"model": "m", "messages": [{"role": "user", "content": ""}]}).encode()
    return shell.replace(b'"content": ""', b'"content": "' + b"x" * (size - len(shell)) + b'"')


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=50).map(lambda b: b'{"model": "m", "prompt": "' + b + b'\xff\xc0\x80"}'),
    st.tuples(st.sampled_from([b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}',
                               b'{"model": "m", "prompt": "hello", "stream": true}']),
              st.integers(0, 60), st.binary(max_size=3))
    .map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:]),  # malformed: a few bytes inserted
    st.tuples(st.sampled_from([10, 500, 5000, 30000]), st.sampled_from(["list", "dict"])).map(lambda t: nested(*t)),
    st.sampled_from([b"", b"null", b"[]", b"1e999999", b'"str"', b"NaN", b'{"model": NaN, "prompt": Infinity}',
                     b'{"a": 1} {"b": 2}', b"\xef\xbb\xbf{}", b'{"prompt": "\\ud800"}', b"{" * 100000]),
    st.sampled_from([LIMIT - 1, LIMIT, LIMIT + 1, 2 * LIMIT, 16 * LIMIT]).map(sized),
)


def expected(body: bytes) -> tuple[int, str | None] | None:
    """The proxy's own answer to `body` on a JSON endpoint, or None when it forwards it."""
    if len(body) > LIMIT:
        return 413, "request_too_large"
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return 400, None
    return None if isinstance(parsed, dict) else (400, None)


@PROXIES
@FUZZ
@given(body=raw_bodies, endpoint=st.sampled_from([b"chat/completions", b"completions", b"responses",
                                                  b"messages", b"moderations", b"chat/completions/batch"]))
def test_malformed_and_oversized_bodies(stack, proxy, body, endpoint):
    reply, seen = check(stack, proxy, b"POST", b"/v1/" + endpoint, [(b"content-type", b"application/json")], body)
    answer = expected(body)
    if answer is not None:
        assert not seen and (reply.status, json.loads(reply.body)["error"].get("code")) == answer


# -- paths -------------------------------------------------------------------------------

PIECES = ["..", ".", "%2e%2e", "%2E%2e", ".%2e", "%2f", "%2F", "%5c", "%00", "%252e%252e", "%", "%zz", "",
          "\\", "..\\..", "admin", "models", "chat", "completions", ";x=1", "~", "%c3%a9", "%e2%80%ae",
          "a" * 2000, "%63ompletions", "chat%2Dx", "%7E", "%41%2e"]
segments = st.lists(st.sampled_from(PIECES) | st.text(max_size=8).map(lambda t: quote(t, safe="")), max_size=6)


@st.composite
def targets(draw) -> bytes:
    prefix = draw(st.sampled_from(["/v1/", "/v1", "/", "//v1/", "/v1//", "/v2/", "/V1/", "/v1/chat/"]))
    path = prefix + "/".join(draw(segments))
    if draw(st.booleans()):
        path += "?" + draw(st.sampled_from(["a=1", "q=%zz", "x=..%2f..", "a=%c3%a9&b", "", "?", "#f"]))
    return path.encode("latin-1")


@PROXIES
@FUZZ
@given(target=targets(), method=st.sampled_from([b"GET", b"POST", b"DELETE"]))
@example(target=b"/V1/%252e%252e/%63ompletions", method=b"POST")  # the prefix in another case: forwarded as /v1
def test_odd_paths_never_leave_the_base_path(stack, proxy, target, method):
    body = json.dumps({"model": "m", "prompt": "hi"}).encode() if method == b"POST" else b""
    reply, seen = check(stack, proxy, method, target, [(b"content-type", b"application/json")], body)
    path = path_of(target)
    if not stays_under_base(path) or b"%2f" in path.lower():
        assert not seen, target


@pytest.mark.parametrize("target", [
    b"/v1/../admin", b"/v1/%2e%2e/admin", b"/v1/%2E%2E/%2E%2E/etc/passwd", b"/v1/..%2fadmin", b"/v1%2f..%2fadmin",
    b"/v1//admin", b"/v1/\\..\\admin", b"/v1/./models", b"/v1/%5c..%5cadmin", b"/v1/models%00",
    b"/v1/" + b"x" * 6000, b"/v1/caf%C3%A9", b"/v1/\xc3\xa9", b"/v1/models?x=\xff",
    b"http://evil.example/v1/models", b"*", b"v1/models",
])
@PROXIES
def test_known_traversal_and_odd_targets(stack, proxy, target):
    reply, seen = check(stack, proxy, b"GET", target, http_valid=b"\xc3" not in target and b"\xff" not in target
                        and not target.startswith(b"v1"))
    if not stays_under_base(path_of(target)) or b"%2f" in target.lower() or b"%00" in target:
        assert not seen and reply.status in (400, 404), target


# -- methods and headers -----------------------------------------------------------------

header_names = st.sampled_from([b"x-custom", b"authorization", b"connection", b"te", b"upgrade", b"x-script",
                                b"accept-encoding", b"content-type", b"x-forwarded-for", b"cookie", b"expect"])
header_values = st.one_of(
    st.binary(max_size=40).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7f)),  # obs-text included
    st.sampled_from([b"", b"close, x-custom", b"Bearer \xe9\xe9", b"caf\xc3\xa9", b"gzip", b"trailers",
                     b"application/json; charset=latin-1", b"100-continue", b"a" * 7000, b"text:BOMB"]),
)


@PROXIES
@FUZZ
@given(method=st.sampled_from([b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS", b"TRACE",
                               b"PROPFIND", b"get", b"BREW"]),
       target=st.sampled_from([b"/v1/models", b"/v1/chat/completions", b"/v1/anything", b"/healthz", b"/metrics"]),
       headers=st.lists(st.tuples(header_names, header_values), max_size=4))
def test_odd_methods_and_headers(stack, proxy, method, target, headers):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode() \
        if method in (b"POST", b"PUT", b"PATCH") else b""
    check(stack, proxy, method, target, headers, body, http_valid=method in PARSED_METHODS)


# Method tokens uvicorn's HTTP parser (httptools, llhttp) accepts; it answers others itself.
PARSED_METHODS = {b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS", b"TRACE", b"PROPFIND"}


# -- what the fuzz found, one case each ----------------------------------------------------

@PROXIES
def test_non_ascii_header_value_is_forwarded_not_500(stack, proxy):
    """Header values may carry obs-text bytes (RFC 9110 §5.5); they are forwarded as sent."""
    before = len(stack.upstream.paths)
    reply = exchange(stack.proxies[proxy].port, b"GET", b"/v1/anything", [(b"x-note", b"caf\xe9")])
    assert reply.status == 200, reply.body[:200]
    assert len(stack.upstream.paths) == before + 1
    assert json.loads(reply.body)["headers"]["x-note"] == "caf\xe9"  # the echo decodes latin-1


@PROXIES
def test_white_space_around_a_header_value_is_not_forwarded(stack, proxy):
    """The server's parser leaves trailing white space on a value; it is not part of the
    value (RFC 9110 5.5), and httpx's h11 transport, which sends HEAD requests, refused
    it: HEAD /v1/models with `x-custom: ! ` was a 502."""
    before = len(stack.upstream.paths)
    head = exchange(stack.proxies[proxy].port, b"HEAD", b"/v1/models", [(b"x-custom", b"! ")])
    echoed = exchange(stack.proxies[proxy].port, b"GET", b"/v1/anything", [(b"x-note", b"padded \t")])
    assert head.status == 200 and echoed.status == 200, (head.status, echoed.body[:200])
    assert len(stack.upstream.paths) == before + 2
    assert json.loads(echoed.body)["headers"]["x-note"] == "padded"


@PROXIES
@pytest.mark.parametrize("method,target", [(b"TRACE", b"/v1/models"), (b"PROPFIND", b"/v1/models"),
                                           (b"GET", b"*"), (b"OPTIONS", b"*"), (b"GET", b"/v1/%0A0")])
def test_requests_no_route_serves_get_the_error_envelope(stack, proxy, method, target):
    reply = exchange(stack.proxies[proxy].port, method, target)
    assert reply.status in (400, 404, 405), reply.body
    assert reply.content_type.startswith("application/json"), reply.body
    assert is_envelope(json.loads(reply.body))


def test_huge_n_on_a_guarded_stream_costs_no_memory_per_choice(stack):
    """`n` is the client's; the guard must not allocate state for a million choices it never sees.

    Measured with tracemalloc (the proxy runs in this process): per-choice state for
    n = 300000 was about 80 MB. A guarded route answers n > 128 (OpenAI's bound) with 400.
    """
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                       "n": 300_000}).encode()
    tracemalloc.start()
    try:
        reply = exchange(stack.proxies["guarded"].port, b"POST", b"/v1/chat/completions",
                         [(b"x-script", b"text:one two three")], body, timeout=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reply.status == 400 and json.loads(reply.body)["error"]["param"] == "n"
    assert peak < 16 << 20, f"peak {peak >> 20} MiB while refusing one request"
