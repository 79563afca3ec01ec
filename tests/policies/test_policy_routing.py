from __future__ import annotations

import pytest

from policies.auth import authenticate, bearer_token
from policies.config import parse_config
from policies.errors import RoutingHeaderError, UnsafePathError
from policies.routing import guard_needed, match_route, normalize_path, routing_table
from tests.policies.cases import load_example

CONFIG = parse_config("""\
server:
  api_keys: [{key: key-a, name: team-a}, {key: key-b, name: team-b}, key-c]
upstreams:
  local: {base_url: "http://127.0.0.1:8000/v1", api_key: upstream-secret}
  openai: {base_url: "https://api.example.com/v1/"}
policies:
  kids: {}
  gpt: {}
  team: {}
  root: {}
routes:
  - {name: kids-prefix, prefix: /kids/v1, upstream: local, policy: kids}
  - {name: kids-header, prefix: /v1, header: {name: X-Tenant, value: "kid*"}, upstream: local, policy: kids}
  - {name: gpt, prefix: /v1, model: "gpt-4*", upstream: openai, policy: gpt}
  - {name: team-a, prefix: /team/v1, api_key: team-a, upstream: local, policy: team}
  - {name: default, prefix: /v1, upstream: local, policy: default}
  - {name: root, prefix: /, upstream: local, policy: root}
""", env={})

# (path, model, headers, api key name, route name or None, upstream_path)
MATCHES = [
    ("/v1/chat/completions", None, {}, None, "default", "/chat/completions"),
    ("/v1", None, {}, None, "default", ""),
    ("/v1/", None, {}, None, "default", "/"),
    ("/v1x/chat/completions", None, {}, None, "root", "/v1x/chat/completions"),
    ("/kids/v1/chat/completions", None, {}, None, "kids-prefix", "/chat/completions"),
    ("/kids/v1/chat/completions", "gpt-4o", {}, None, "kids-prefix", "/chat/completions"),
    ("/kids/v1x", None, {}, None, "root", "/kids/v1x"),
    # prefixes match segments in any case and without matrix parameters, as endpoints are
    # known: a strict route's path reached a laxer route by its case or a `;param` (it was
    # "root" here), which an upstream that ignores case (Express) or strips `;params`
    # (Tomcat) serves as the strict route's endpoint
    ("/KIDS/v1/chat/completions", None, {}, None, "kids-prefix", "/chat/completions"),
    ("/kids;x=1/V1/chat/completions", None, {}, None, "kids-prefix", "/chat/completions"),
    ("/kids/v1;x=1/chat/completions", None, {}, None, "kids-prefix", "/chat/completions"),
    ("/kids/v1;x=1", None, {}, None, "kids-prefix", ""),
    ("/kids/v1x;x=1", None, {}, None, "root", "/kids/v1x;x=1"),
    ("/v1/chat/completions", None, {"x-tenant": "kids"}, None, "kids-header", "/chat/completions"),
    ("/v1/chat/completions", None, {"X-TENANT": "kiddo"}, None, "kids-header", "/chat/completions"),
    ("/v1/chat/completions", None, {"x-tenant": "adults"}, None, "default", "/chat/completions"),
    ("/v1/chat/completions", None, {"x-tenant": "KIDS"}, None, "default", "/chat/completions"),
    ("/v1/chat/completions", "gpt-4o", {}, None, "gpt", "/chat/completions"),
    ("/v1/chat/completions", "gpt-4", {}, None, "gpt", "/chat/completions"),
    ("/v1/chat/completions", "GPT-4o", {}, None, "default", "/chat/completions"),
    ("/v1/chat/completions", "gpt-3.5", {}, None, "default", "/chat/completions"),
    ("/v1/chat/completions", "gpt-4o", {"x-tenant": "kids"}, None, "kids-header", "/chat/completions"),
    ("/team/v1/chat/completions", None, {}, "team-a", "team-a", "/chat/completions"),
    ("/team/v1/chat/completions", None, {}, "team-b", "root", "/team/v1/chat/completions"),
    ("/team/v1/chat/completions", None, {}, None, "root", "/team/v1/chat/completions"),
    ("/v1/chat/completions", None, {}, "team-a", "default", "/chat/completions"),
    ("/v1/chat/completions", "gpt-4o", {}, "team-a", "gpt", "/chat/completions"),
    ("/other", None, {}, None, "root", "/other"),
]


@pytest.mark.parametrize(("path", "model", "headers", "key", "route", "rest"), MATCHES)
def test_match_route(path, model, headers, key, route, rest):
    match = match_route(CONFIG, path, model=model, headers=headers, api_key_name=key)
    assert match is not None
    assert (match.route.name, match.upstream_path) == (route, rest)
    assert match.upstream is CONFIG.upstreams[match.route.upstream]
    assert match.policy is CONFIG.policies[match.route.policy]
    assert match.upstream_url == match.upstream.base_url + rest


def test_a_routing_header_given_twice_with_two_values_is_refused():
    """`x-tenant: adult` then `x-tenant: kids`: the first value alone was read, so the
    order of two lines chose between the kids route and a laxer one. Either reading of two
    values is a guess, so the request is refused; the same value twice is one value."""
    twice = [("x-tenant", "adult"), ("X-Tenant", "kids")]
    with pytest.raises(RoutingHeaderError, match="'x-tenant' is given 2 times"):
        match_route(CONFIG, "/v1/chat/completions", headers=MultiHeaders(twice))
    with pytest.raises(RoutingHeaderError):
        match_route(CONFIG, "/v1/chat/completions", headers=MultiHeaders(twice[::-1]))
    same = match_route(CONFIG, "/v1/chat/completions", headers=MultiHeaders([("x-tenant", "kids")] * 2))
    assert same.route.name == "kids-header"


class MultiHeaders(dict):
    """Headers as an ASGI server gives them: `items()` has every line, repeats included."""

    def __init__(self, lines: list[tuple[str, str]]) -> None:
        super().__init__(lines)
        self.lines = lines

    def items(self):
        return list(self.lines)


@pytest.mark.parametrize("path", ["/", "/v2/chat/completions", "/redteam", "/v1x", "/redteam/v1x/models"])
def test_no_match_is_none(path):
    assert match_route(load_example(), path) is None


@pytest.mark.parametrize(("path", "route"), [
    ("/redteam/v1/chat/completions", "redteam"),
    ("/redteam/v1", "redteam"),
    ("/v1/chat/completions", "default"),
    ("/v1/redteam/v1/chat/completions", "default"),
])
def test_example_routes(path, route):
    assert match_route(load_example(), path).policy.name == route


UNSAFE = [
    "v1/chat/completions",
    "/v1/../admin",
    "/v1/..",
    "/redteam/v1/../../v1/chat",
    "/v1/./chat/completions",
    "/v1//chat/completions",
    "//evil.example.com/v1",
    "/v1/%2e%2e/admin",
    "/v1/%2E%2E/admin",
    "/v1/..%2fadmin",
    "/v1%2Fchat",
    "/v1/chat%5c..",
    "/v1\\..\\admin",
    "/v1/chat%00",
    "/v1/chat\ncompletions",
    # a dot segment with matrix parameters: Tomcat and Spring strip `;x` and then climb out
    # of the base path (`/v1/..;/admin` is `/admin` to them)
    "/v1/..;/admin",
    "/v1/..;x=1/admin",
    "/v1/.;x/models",
]


@pytest.mark.parametrize("path", UNSAFE)
def test_unsafe_paths_are_rejected_before_matching(path):
    with pytest.raises(UnsafePathError):
        match_route(CONFIG, path)


@pytest.mark.parametrize("path", ["/v1/models/my%20model", "/v1/files/file-abc.jsonl", "/v1/a..b"])
def test_dots_and_other_escapes_inside_segments_are_fine(path):
    assert match_route(CONFIG, path) is not None


def test_routing_table_lists_routes_in_order_without_secrets():
    table = routing_table(CONFIG)
    names = ["kids-prefix", "kids-header", "gpt", "team-a", "default", "root"]
    positions = [table.index(f"  {name}  ") for name in names]
    assert positions == sorted(positions)
    assert "x-tenant: kid*" in table and "model=gpt-4*" in table and "api_key=team-a" in table
    assert "https://api.example.com/v1" in table and "(no match: 404)" in table
    assert "auth: 3 API key(s): team-a, team-b, api_keys[2]" in table
    for secret in ("key-a", "key-b", "key-c", "upstream-secret"):
        assert secret not in table


def test_routing_table_of_the_example():
    table = routing_table(load_example())
    assert "policy redteam: prompt shadow@0.5" in table
    assert "response cut@0.9 every 16 hold 0; on_guard_error block; unguarded endpoints block" in table
    assert "auth: off" in table
    assert table.endswith("guard: the embedded default head, device auto, dtype auto; prefix cache 256 MiB, shared")


def test_routing_table_shows_safest_of_n_and_moderations():
    """They change what a route answers, and the table left them out."""
    table = routing_table(parse_config(
        "upstreams: {up: {base_url: 'http://127.0.0.1:8000/v1'}}\n"
        "policies: {p: {moderations: guard, rerank: {n: 4, select: first_safe}}}\n"
        "routes: [{prefix: /v1, upstream: up, policy: p}]\n", env={}))
    assert "; unguarded endpoints block; moderations guard; rerank first_safe of 4" in table
    assert "policy p: " in table


@pytest.mark.parametrize("extra,expect", [
    ("server: {api_keys: [k1]}\n", "prefix cache 256 MiB, per API key"),
    ("server: {api_keys: [k1]}\nguard: {prefix_cache_scope: shared}\n", "prefix cache 256 MiB, shared"),
    ("guard: {prefix_cache_mb: 0, artifact: /heads/x, device: cpu}\n",
     "guard: /heads/x, device cpu, dtype auto; prefix cache off"),
])
def test_routing_table_says_what_guard_serve_loads(extra, expect):
    base = "upstreams: {up: {base_url: 'http://x/v1'}}\nroutes: [{prefix: /v1, upstream: up, policy: default}]\n"
    assert expect in routing_table(parse_config(base + extra)).splitlines()[-1]


@pytest.mark.parametrize("extra,expect", [
    ("", ("unknown previous responses forward", "responses memory: 64 MiB, per upstream")),
    ("server: {api_keys: [k1], responses_memory_mb: 8}\n",
     ("unknown previous responses forward", "responses memory: 8 MiB, per API key and upstream")),
    ("server: {responses_memory_mb: 0}\npolicies: {default: {unknown_previous_response: block}}\n",
     ("unknown previous responses block", "responses memory: off")),
])
def test_routing_table_says_how_chained_responses_are_read(extra, expect):
    base = "upstreams: {up: {base_url: 'http://x/v1'}}\nroutes: [{prefix: /v1, upstream: up, policy: default}]\n"
    lines = routing_table(parse_config(base + extra)).splitlines()
    assert lines[-6].endswith(f"; {expect[0]}") and lines[-2] == expect[1]


def test_routing_table_says_the_front_doors_bounds_and_cors():
    base = "upstreams: {up: {base_url: 'http://x/v1'}}\nroutes: [{prefix: /v1, upstream: up, policy: default}]\n"
    lines = routing_table(parse_config(base)).splitlines()
    assert lines[-4:-2] == [
        "front door: heads 65536 bytes within 30 s, body silences 60 s, keep-alive 5 s, connections unbounded "
        "(unbounded per client)", "cors: off (preflights forwarded; the upstream's policy applies)"]
    lines = routing_table(parse_config(base + (
        "server: {max_connections: 900, max_connections_per_client: 40, body_timeout: null, "
        "cors_origins: ['https://A.example', '*']}\n"))).splitlines()
    assert lines[-4:-2] == [
        "front door: heads 65536 bytes within 30 s, body silences unbounded, keep-alive 5 s, connections 900 "
        "(40 per client)", "cors: https://a.example, *"]


def test_routing_table_says_no_guard_loads_when_no_route_scores():
    text = ("upstreams: {up: {base_url: 'http://x/v1'}}\n"
            "policies: {open: {prompt: {action: off}, response: {action: off}}}\n"
            "routes: [{prefix: /v1, upstream: up, policy: open}]\n")
    assert routing_table(parse_config(text)).splitlines()[-1].startswith("guard: not loaded")
    # A policy that answers moderations from the guard needs it, with both stages off.
    answers = text.replace("response: {action: off}}", "response: {action: off}, moderations: guard}")
    assert answers != text and guard_needed(parse_config(answers))
    assert routing_table(parse_config(answers)).splitlines()[-1].startswith("guard: the embedded default head")


# (Authorization header, api key name)
AUTH = [
    ("Bearer key-a", "team-a"),
    ("bearer key-b", "team-b"),
    ("BEARER   key-c  ", "api_keys[2]"),
    ("Bearer key-a ", "team-a"),
    ("Bearer key-ab", None),
    ("Bearer key-", None),
    ("Bearer KEY-A", None),
    ("Basic key-a", None),
    ("key-a", None),
    ("Bearer ", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize(("header", "name"), AUTH)
def test_authenticate(header, name):
    assert authenticate(CONFIG, header) == name


def test_authenticate_without_keys_is_never_a_name():
    config = load_example()
    assert not config.server.auth_required and CONFIG.server.auth_required
    assert authenticate(config, "Bearer anything") is None


@pytest.mark.parametrize(("header", "token"), [("Bearer t", "t"), ("Token t", None), ("Bearer", None)])
def test_bearer_token(header, token):
    assert bearer_token(header) == token


@pytest.mark.parametrize(("raw", "normal"), [
    ("/v1/chat/%63ompletions", "/v1/chat/completions"),
    ("/%76%31/m%65ssages", "/v1/messages"),
    ("/v1/a%2Db%5fc%7E", "/v1/a-b_c~"),
    ("/v1/%2e%2e/admin", "/v1/%2e%2e/admin"),  # '.' stays escaped, for check_path to refuse
    ("/v1/files%2fetc", "/v1/files%2fetc"),  # reserved and other characters stay as sent
    ("/v1/x%3Ay%20z%c3%a9%zz%4", "/v1/x%3Ay%20z%c3%a9%zz%4"),
    ("/v1/chat/completions", "/v1/chat/completions"),
])
def test_escaped_unreserved_characters_are_decoded_before_routing(raw, normal):
    assert normalize_path(raw) == normal
