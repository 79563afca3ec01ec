from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import pytest

from policies.config import (
    DEFAULT_REFUSAL, ApiKey, GuardConfig, Policy, PromptStage, ResponseStage, Rerank, Route,
    ServerConfig, load_config, parse_config, upstream_base_url,
)
from policies.errors import ConfigError
from tests.policies.cases import EXAMPLE, load_example, parse

UP = "upstreams:\n  local:\n    base_url: http://127.0.0.1:8000/v1\n"
REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "config.reference.yaml"


def test_example_loads_and_means_what_it_says():
    example = load_example()
    assert [(r.prefix, r.upstream, r.policy) for r in example.routes] == [
        ("/redteam/v1", "local", "redteam"), ("/v1", "local", "default")]
    assert example.upstreams["local"].base_url == "http://127.0.0.1:8000/v1"
    default, redteam = example.policies["default"], example.policies["redteam"]
    assert default.prompt == PromptStage(action="refuse", threshold=0.5)
    assert default.response == ResponseStage(action="cut", threshold=0.5, check_every=16, holdback=16)
    assert redteam.prompt.action == "shadow"
    assert redteam.response == ResponseStage(action="cut", threshold=0.9, check_every=16, holdback=0)
    assert default.on_guard_error == redteam.on_guard_error == "block"
    assert default.unguarded_endpoints == redteam.unguarded_endpoints == "block"
    assert example.server == ServerConfig() and example.guard == GuardConfig()
    assert example.path == "config.yaml"


def test_defaults_when_routes_and_policies_are_omitted():
    config = parse(UP)
    assert config.routes == (Route(name="default", prefix="/v1", upstream="local", policy="default"),)
    assert config.policies["default"] == Policy(name="default")
    assert config.policies["default"].refusal == DEFAULT_REFUSAL


def test_a_written_default_policy_replaces_the_built_in():
    config = parse(UP + "policies:\n  default:\n    prompt: {action: block, threshold: 0.7}\n")
    assert config.policies["default"].prompt == PromptStage(action="block", threshold=0.7)
    assert config.policies["default"].response == ResponseStage()


def test_every_key_parses():
    config = parse("""\
        server:
          host: 0.0.0.0
          port: 9000
          max_body_bytes: 1000
          api_keys: ["${K1}", {key: "${K2}", name: team-a}]
          max_concurrent_streams: 8
          request_timeout: 30
          shutdown_timeout: 25
          audit_log: /tmp/audit.jsonl
          log_level: debug
          max_head_bytes: 16384
          head_timeout: 10
          keep_alive_timeout: 2.5
          max_connections: 500
          max_connections_per_client: 20
          body_timeout: null
        upstreams:
          vllm:
            base_url: https://example.com/v1/
            api_key: ${UP}
            connect_timeout: 1
            read_timeout: 2.5
            max_connections: 3
        guard:
          artifact: /models/head
          backbone: pypi:some-backbone
          device: cuda:1
          dtype: bfloat16
          max_batch_size: 4
          max_wait_ms: 0
          max_queue: 5
          trust_remote_code: true
        policies:
          kids:
            refusal: No.
            on_guard_error: allow
            prompt:
              action: steer
              threshold: 0.6
              scope: conversation_with_system
              mode: sequential
              steer: {from: 0.2, system_message: Be safe.}
            response:
              action: flag
              threshold: 0.4
              check_every: 8
              holdback: 32
              include_prompt: false
              end_all_choices: true
        routes:
          - name: kids
            prefix: /kids/v1/
            upstream: vllm
            policy: kids
            model: "gpt-4*"
            header: {name: X-Tenant, value: kids}
            api_key: team-a
        """, K1="s1", K2="s2", UP="up-secret")
    assert config.server == ServerConfig(
        host="0.0.0.0", port=9000, max_body_bytes=1000,
        api_keys=(ApiKey("api_keys[0]", "s1"), ApiKey("team-a", "s2")), max_concurrent_streams=8,
        request_timeout=30.0, shutdown_timeout=25.0, audit_log="/tmp/audit.jsonl", log_level="debug",
        max_head_bytes=16384, head_timeout=10.0, keep_alive_timeout=2.5, max_connections=500,
        max_connections_per_client=20, body_timeout=None)
    up = config.upstreams["vllm"]
    assert (up.base_url, up.api_key, up.connect_timeout, up.read_timeout, up.max_connections) == (
        "https://example.com/v1", "up-secret", 1.0, 2.5, 3)
    assert config.guard == GuardConfig("/models/head", "pypi:some-backbone", "cuda:1", "bfloat16", 4, 0.0, 5, True)
    kids = config.policies["kids"]
    assert kids == Policy(
        name="kids", refusal="No.", on_guard_error="allow",
        prompt=PromptStage("steer", 0.6, "conversation_with_system", "sequential", 0.2, "Be safe."),
        response=ResponseStage("flag", 0.4, 8, 32, False, True))
    assert config.routes == (Route("kids", "/kids/v1", "vllm", "kids", "gpt-4*", "x-tenant", "kids", "team-a"),)
    assert set(config.policies) == {"kids", "default"}


def test_values_are_frozen():
    example = load_example()
    with pytest.raises(AttributeError):
        example.routes[0].prefix = "/x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        example.policies["new"] = Policy("new")  # type: ignore[index]


def test_secrets_are_not_in_reprs():
    config = parse(UP.replace("v1\n", "v1\n    api_key: ${UP}\n")
                   + "server:\n  api_keys: [{key: '${K}', name: a}]\n", UP="sekrit-up", K="sekrit-key")
    assert config.upstreams["local"].api_key == "sekrit-up"
    assert "sekrit" not in repr(config)


# (yaml text, key path named, line named, words in the reason)
ERRORS = [
    ("", "", None, "empty"),
    ("upstreams: [\n", "", 2, "invalid YAML"),
    ("- a\n- b\n", "", 1, "expected a mapping"),
    ("upstreams: {}\n", "upstreams", 1, "at least one upstream"),
    ("upstreams:\n  local: {}\n", "upstreams.local.base_url", 2, "required"),
    ("upstreams:\n  local:\n    base_url: ftp://x/v1\n", "upstreams.local.base_url", 3, "http(s)"),
    ("upstreams:\n  local:\n    base_url: http:///v1\n", "upstreams.local.base_url", 3, "http(s)"),
    ("upstreams:\n  local:\n    base_url: http://x/v1?a=1\n", "upstreams.local.base_url", 3, "query"),
    ("upstreams:\n  local:\n    base_url: 8000\n", "upstreams.local.base_url", 3, "expected a string"),
    ("upstreams:\n  local:\n    base_url: http://x:99999/v1\n", "upstreams.local.base_url", 3,
     "the port must be a number in 1-65535; got 'http://x:99999/v1'"),
    ("upstreams:\n  local:\n    base_url: http://x:0/v1\n", "upstreams.local.base_url", 3, "port must be"),
    ("upstreams:\n  local:\n    base_url: http://x:eighty/v1\n", "upstreams.local.base_url", 3, "port must be"),
    ("upstreams:\n  local:\n    base_url: 'http://[::1/v1'\n", "upstreams.local.base_url", 3, "http(s)"),
    (UP + "    connect_timeout: 1.0e+400\n", "upstreams.local.connect_timeout", 4,
     "expected a finite number, got infinity"),
    (UP + "    connect_timeout: 1" + "0" * 400 + "\n", "upstreams.local.connect_timeout", 4,
     "got an integer too large for a float"),
    (UP + "    connect_timeout: 1e3\n", "upstreams.local.connect_timeout", 4,
     "got a string (YAML reads '1e3' as a string: write an exponent with a '.' and a sign, e.g. 1.0e+3)"),
    (UP + "    max_connections: '8'\n", "upstreams.local.max_connections", 4,
     "expected an integer, got a string ('8' is quoted: write the number without quotes)"),
    (UP + "    read_timeout: 0\n", "upstreams.local.read_timeout", 4, "> 0"),
    (UP + "    connect_timeout: true\n", "upstreams.local.connect_timeout", 4, "finite number"),
    (UP + "    max_connections: 1.5\n", "upstreams.local.max_connections", 4, "integer"),
    (UP + "    base_uri: http://x\n", "upstreams.local.base_uri", 4, "unknown key"),
    (UP + "    api_key: ${NOPE}\n", "upstreams.local.api_key", 4, "NOPE is not set"),
    (UP + "    api_key: ${NOPE\n", "upstreams.local.api_key", 4, "unterminated"),
    (UP + "    api_key: ${1BAD}\n", "upstreams.local.api_key", 4, "bad variable name"),
    (UP + "upstream:\n  x: 1\n", "upstream", 4, "unknown key"),
    (UP + "upstreams:\n  b: {}\n", "upstreams", 4, "duplicate key"),
    (UP + "server:\n  port: 70000\n", "server.port", 5, "<= 65535"),
    (UP + "server:\n  port: '8080'\n", "server.port", 5, "integer"),
    (UP + "server:\n  port: true\n", "server.port", 5, "integer"),
    (UP + "server:\n  max_body_bytes: 0\n", "server.max_body_bytes", 5, ">= 1"),
    (UP + "server:\n  max_prompt_bytes: 0\n", "server.max_prompt_bytes", 5, ">= 1"),
    (UP + "server:\n  log_level: loud\n", "server.log_level", 5, "one of debug"),
    (UP + "server:\n  request_timeout: -1\n", "server.request_timeout", 5, "> 0"),
    (UP + "server:\n  shutdown_timeout: 0\n", "server.shutdown_timeout", 5, "> 0"),
    (UP + "server:\n  shutdown_timeout: null\n", "server.shutdown_timeout", 5, "number"),
    (UP + "server:\n  max_head_bytes: 1000\n", "server.max_head_bytes", 5, ">= 1024"),
    (UP + "server:\n  max_head_bytes: 2000000\n", "server.max_head_bytes", 5, "<= 1048576"),
    (UP + "server:\n  max_head_bytes: null\n", "server.max_head_bytes", 5, "integer"),
    (UP + "server:\n  head_timeout: 0\n", "server.head_timeout", 5, "> 0"),
    (UP + "server:\n  head_timeout: null\n", "server.head_timeout", 5, "number"),
    (UP + "server:\n  keep_alive_timeout: -1\n", "server.keep_alive_timeout", 5, "> 0"),
    (UP + "server:\n  max_connections: 0\n", "server.max_connections", 5, ">= 1"),
    (UP + "server:\n  max_connections_per_client: 1.5\n", "server.max_connections_per_client", 5, "integer"),
    (UP + "server:\n  body_timeout: 0\n", "server.body_timeout", 5, "> 0"),
    (UP + "server:\n  body_timeout: .inf\n", "server.body_timeout", 5, "finite"),
    (UP + "server:\n  api_keys: ''\n", "server.api_keys", 5, "expected a list"),
    (UP + "server:\n  api_keys: ['']\n", "server.api_keys[0]", 5, "empty"),
    (UP + "server:\n  api_keys: [3]\n", "server.api_keys[0]", 5, "string or"),
    (UP + "server:\n  api_keys:\n    - a\n    - a\n", "server.api_keys[1]", 7, "duplicate api key value"),
    (UP + "server:\n  api_keys:\n    - {key: a, name: n}\n    - {key: b, name: n}\n", "server.api_keys[1]", 7, "duplicate api key name"),
    (UP + "server:\n  api_keys:\n    - {key: a, nam: n}\n", "server.api_keys[0].nam", 6, "unknown key"),
    (UP + "guard:\n  device: gpu\n", "guard.device", 5, "cuda:N"),
    (UP + "guard:\n  dtype: int8\n", "guard.dtype", 5, "one of auto"),
    (UP + "guard:\n  trust_remote_code: yes\n", "guard.trust_remote_code", 5, "true or false"),
    (UP + "guard:\n  max_wait_ms: .nan\n", "guard.max_wait_ms", 5, "finite"),
    (UP + "policies:\n  p:\n    prompt: {threshold: 1.5}\n", "policies.p.prompt.threshold", 6, "<= 1.0"),
    (UP + "policies:\n  p:\n    prompt: {threshold: -0.1}\n", "policies.p.prompt.threshold", 6, ">= 0.0"),
    (UP + "policies:\n  p:\n    prompt: {threshold: true}\n", "policies.p.prompt.threshold", 6, "finite number"),
    (UP + "policies:\n  p:\n    prompt: {action: deny}\n", "policies.p.prompt.action", 6, "one of refuse"),
    (UP + "policies:\n  p:\n    prompt: {scope: all}\n", "policies.p.prompt.scope", 6, "one of last_user"),
    (UP + "policies:\n  p:\n    prompt: {mode: async}\n", "policies.p.prompt.mode", 6, "one of sequential"),
    (UP + "policies:\n  p:\n    prompt: {action: steer}\n", "policies.p.prompt.steer", 6, "required"),
    (UP + "policies:\n  p:\n    prompt: {action: refuse, steer: {from: 0.1, system_message: x}}\n",
     "policies.p.prompt.steer", 6, "only valid with action: steer"),
    (UP + "policies:\n  p:\n    prompt:\n      action: steer\n      steer: {from: 0.5, system_message: x}\n",
     "policies.p.prompt.steer.from", 8, "< threshold"),
    (UP + "policies:\n  p:\n    prompt:\n      action: steer\n      steer: {from: 0.1}\n",
     "policies.p.prompt.steer.system_message", 8, "required"),
    (UP + "policies:\n  p:\n    prompt:\n      action: steer\n      mode: parallel\n      steer: {from: 0.1, system_message: x}\n",
     "policies.p.prompt.mode", 8, "parallel"),
    (UP + "policies:\n  p:\n    response: {action: refuse}\n", "policies.p.response.action", 6, "one of cut"),
    (UP + "policies:\n  p:\n    response: {check_every: 0}\n", "policies.p.response.check_every", 6, ">= 1"),
    (UP + "policies:\n  p:\n    response: {check_every: 1e400}\n", "policies.p.response.check_every", 6,
     "expected an integer, got a string (YAML reads '1e400' as a string"),
    (UP + "policies:\n  p:\n    response: {check_every: 1.0e+400}\n", "policies.p.response.check_every", 6,
     "expected an integer, got infinity"),
    (UP + "policies:\n  p:\n    prompt: {threshold: 5e-1}\n", "policies.p.prompt.threshold", 6,
     "YAML reads '5e-1' as a string"),
    (UP + "policies:\n  p:\n    response: {holdback: -1}\n", "policies.p.response.holdback", 6, ">= 0"),
    (UP + "policies:\n  p:\n    response: {include_prompt: 1}\n", "policies.p.response.include_prompt", 6, "true or false"),
    (UP + "policies:\n  p:\n    response: {threshhold: 0.5}\n", "policies.p.response.threshhold", 6, "unknown key"),
    (UP + "policies:\n  p:\n    on_guard_error: ignore\n", "policies.p.on_guard_error", 6, "one of block"),
    (UP + "policies:\n  p:\n    unguarded_endpoints: allow\n", "policies.p.unguarded_endpoints", 6, "one of block"),
    (UP + "policies:\n  p:\n    moderations: yes\n", "policies.p.moderations", 6, "one of forward"),
    (UP + "policies:\n  p:\n    unknown_previous_response: refuse\n", "policies.p.unknown_previous_response", 6,
     "one of forward, block"),
    (UP + "server: {responses_memory_mb: -1}\n", "server.responses_memory_mb", 4, ">= 0"),
    (UP + "server: {responses_memory_mb: .inf}\n", "server.responses_memory_mb", 4, "got infinity"),
    (UP + "server: {responses_memory_mb: 1.0e+7}\n", "server.responses_memory_mb", 4, "<= 1048576"),
    (UP + "server: {responses_memory_mb: true}\n", "server.responses_memory_mb", 4, "expected a finite number"),
    (UP + "policies:\n  p:\n    refusal: ''\n", "policies.p.refusal", 6, "empty"),
    (UP + "policies:\n  p:\n    rerank: {n: 1}\n", "policies.p.rerank.n", 6, ">= 2"),
    # OpenAI's bound on n, which the proxy puts on a client's n too (it asked the upstream for any n)
    (UP + "policies:\n  p:\n    rerank: {n: 129}\n", "policies.p.rerank.n", 6, "<= 128"),
    (UP + "policies:\n  p:\n    rerank: {select: safest}\n", "policies.p.rerank.n", 6, "required"),
    (UP + "policies:\n  p:\n    rerank: {n: 2, select: best}\n", "policies.p.rerank.select", 6, "one of safest"),
    (UP + "policies:\n  p:\n    response: {action: flag}\n    rerank: {n: 2}\n", "policies.p.rerank", 7,
     "needs response.action: cut"),
    (UP + "policies:\n  p:\n    response: {action: off}\n    rerank: {n: 2}\n", "policies.p.rerank", 7, "is off"),
    (UP + "policies:\n  p: [1]\n", "policies.p", 5, "expected a mapping"),
    # a policy's name is sent in the x-siren-policy header
    (UP + "policies:\n  \u513f\u7ae5: {}\n", "policies.\u513f\u7ae5", 5, "x-siren-policy header"),
    (UP + 'policies:\n  "a\\nb": {}\n', "policies.a\nb", 5, "printable ASCII"),
    (UP + "policies:\n  'kids ': {}\n", "policies.kids ", 5, "printable ASCII"),
    (UP + "routes: []\n", "routes", 4, "at least one route"),
    (UP + "routes: {prefix: /v1}\n", "routes", 4, "expected a list"),
    (UP + "upstreams2: 1\n", "upstreams2", 4, "unknown key"),
    (UP + "routes:\n  - {upstream: local, policy: default}\n", "routes[0].prefix", 5, "required"),
    (UP + "routes:\n  - {prefix: v1, upstream: local, policy: default}\n", "routes[0].prefix", 5, "start with '/'"),
    (UP + "routes:\n  - {prefix: /a/../v1, upstream: local, policy: default}\n", "routes[0].prefix", 5, "'..'"),
    (UP + "routes:\n  - {prefix: /a//v1, upstream: local, policy: default}\n", "routes[0].prefix", 5, "'//'"),
    (UP + "routes:\n  - {prefix: /a%2fv1, upstream: local, policy: default}\n", "routes[0].prefix", 5, "'%'"),
    # characters no request path holds as the router reads it: the route could never match
    (UP + "routes:\n  - {prefix: '/v1?team=a', upstream: local, policy: default}\n", "routes[0].prefix", 5, "'?'"),
    (UP + "routes:\n  - {prefix: '/v1#a', upstream: local, policy: default}\n", "routes[0].prefix", 5, "'#'"),
    (UP + "routes:\n  - {prefix: '/team a/v1', upstream: local, policy: default}\n", "routes[0].prefix", 5, "' '"),
    (UP + "routes:\n  - {prefix: '/caf\u00e9/v1', upstream: local, policy: default}\n", "routes[0].prefix", 5, "'\u00e9'"),
    (UP + "routes:\n  - {prefix: /v1, upstream: remote, policy: default}\n", "routes[0].upstream", 5, "unknown upstream 'remote'"),
    (UP + "routes:\n  - {prefix: /v1, upstream: local, policy: kids}\n", "routes[0].policy", 5, "unknown policy 'kids'"),
    (UP + "routes:\n  - {prefix: /v1, upstream: local, policy: default, api_key: team}\n", "routes[0].api_key", 5, "no server.api_keys"),
    (UP + "routes:\n  - {prefix: /v1, upstream: local, policy: default, header: {value: x}}\n", "routes[0].header.name", 5, "required"),
    (UP + "routes:\n  - {prefix: /v1, upstream: local, policy: default, header: {name: 'a b'}}\n", "routes[0].header.name", 5, "header name"),
    (UP + "routes:\n  - {prefix: /v1, upstream: local, policy: default, modle: x}\n", "routes[0].modle", 5, "unknown key"),
    (UP + "routes:\n  - {prefix: /v1, upstream: local, policy: default, name: a}\n"
          "  - {prefix: /v2, upstream: local, policy: default, name: a}\n", "routes[1].name", 6, "duplicate route name"),
    ("upstreams:\n  a: {base_url: 'http://a'}\n  b: {base_url: 'http://b'}\n", "routes", 1, "more than one upstream"),
]


@pytest.mark.parametrize(("text", "key_path", "line", "reason"), ERRORS)
def test_errors_name_file_key_path_and_line(text, key_path, line, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(text, path="cfg.yaml", env={})
    err = info.value
    assert (err.file, err.key_path, err.line) == ("cfg.yaml", key_path, line)
    assert reason in err.reason
    assert str(err).startswith(f"cfg.yaml:{line}: " if line else "cfg.yaml: ")
    if key_path:
        assert f": {key_path}: " in str(err)


# (earlier route, later route): the later one is unreachable
UNREACHABLE = [
    ("{prefix: /v1}", "{prefix: /v1}"),
    ("{prefix: /v1}", "{prefix: /v1/chat}"),
    ("{prefix: /v1}", "{prefix: /v1/chat, model: 'gpt-*'}"),
    ("{prefix: /}", "{prefix: /kids/v1}"),
    ("{prefix: /v1/}", "{prefix: /v1, header: {name: x-a}}"),
    ("{prefix: /v1, model: 'gpt-*'}", "{prefix: /v1/chat, model: 'gpt-*'}"),
    ("{prefix: /v1, header: {name: X-T, value: k}}", "{prefix: /v1, header: {name: x-t, value: k}, model: m}"),
    ("{prefix: /v1, api_key: team}", "{prefix: /v1, api_key: team}"),
]
REACHABLE = [
    ("{prefix: /v1}", "{prefix: /v1x}"),
    ("{prefix: /v1/chat}", "{prefix: /v1}"),
    ("{prefix: /v1, model: 'gpt-*'}", "{prefix: /v1}"),
    ("{prefix: /v1, model: 'gpt-*'}", "{prefix: /v1, model: 'llama*'}"),
    ("{prefix: /v1, header: {name: x-t, value: a}}", "{prefix: /v1, header: {name: x-t, value: b}}"),
    ("{prefix: /v1, header: {name: x-t}}", "{prefix: /v1, header: {name: x-u}}"),
    ("{prefix: /v1, api_key: team}", "{prefix: /v1}"),
    ("{prefix: /redteam/v1}", "{prefix: /v1}"),
]


def _two_routes(first: str, second: str) -> str:
    def fill(route: str) -> str:
        return route[:-1] + ", upstream: local, policy: default}"
    return UP + "server:\n  api_keys: [{key: k, name: team}]\n" + f"routes:\n  - {fill(first)}\n  - {fill(second)}\n"


@pytest.mark.parametrize(("first", "second"), UNREACHABLE)
def test_unreachable_routes_fail_at_load(first, second):
    with pytest.raises(ConfigError) as info:
        parse_config(_two_routes(first, second), path="cfg.yaml", env={})
    assert (info.value.key_path, info.value.line) == ("routes[1]", 8)
    assert "unreachable" in info.value.reason and "routes[0]" in info.value.reason


@pytest.mark.parametrize(("first", "second"), REACHABLE)
def test_reachable_routes_load(first, second):
    assert len(parse_config(_two_routes(first, second), env={}).routes) == 2


# (raw value, env, interpolated value)
INTERPOLATION = [
    ("plain", {}, "plain"),
    ("${A}", {"A": "x"}, "x"),
    ("pre-${A}-${B}-post", {"A": "1", "B": "2"}, "pre-1-2-post"),
    ("${A:-fallback}", {}, "fallback"),
    ("${A:-fallback}", {"A": "set"}, "set"),
    ("${A:-}", {"A": ""}, ""),
    ("$${A}", {"A": "x"}, "${A}"),
    ("$A", {"A": "x"}, "$A"),
    ("${A}", {"A": "has ${B} inside"}, "has ${B} inside"),  # no second pass over values
]


@pytest.mark.parametrize(("raw", "env", "value"), INTERPOLATION)
def test_interpolation(raw, env, value):
    config = parse_config(UP + f"policies:\n  p:\n    refusal: 'r{raw}'\n", env=env)
    assert config.policies["p"].refusal == "r" + value


@pytest.mark.parametrize("env", [{}, {"A": "sk-a"}, {"B": "sk-b"}])
def test_a_reference_inside_a_default_is_refused(env):
    """`${A:-${B}}` (Docker Compose's nested default) is not expanded: the first `}` closed
    the reference, so the value was `sk-a}` when A was set and the text `${B}` when not,
    silently (a wrong key, a wrong URL)."""
    with pytest.raises(ConfigError) as info:
        parse_config(UP + "    api_key: ${A:-${B}}\n", path="c.yaml", env=env)
    assert str(info.value).startswith("c.yaml:4: upstreams.local.api_key: ") and "nested" in info.value.reason
    assert "sk-" not in str(info.value)


@pytest.mark.parametrize(("raw", "env", "expected"), [
    ("${PORT}", {"PORT": "9001"}, 9001),
    ("${PORT:-8081}", {}, 8081),
])
def test_interpolation_into_numbers(raw, env, expected):
    assert parse_config(UP + f"server:\n  port: '{raw}'\n", env=env).server.port == expected


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("False", False)])
def test_interpolation_into_booleans(raw, expected):
    text = UP + "guard:\n  trust_remote_code: '${TRC}'\n"
    assert parse_config(text, env={"TRC": raw}).guard.trust_remote_code is expected


def test_interpolated_non_number_is_a_type_error_without_the_value():
    with pytest.raises(ConfigError) as info:
        parse_config(UP + "server:\n  port: ${PORT}\n", env={"PORT": "secret-ish"})
    assert info.value.key_path == "server.port" and "secret-ish" not in str(info.value)


def test_an_interpolated_number_that_is_not_finite_is_named_without_its_value():
    with pytest.raises(ConfigError) as info:
        parse_config(UP + "server:\n  request_timeout: ${T}\n", env={"T": "1e999"})
    assert info.value.reason == "expected a finite number, got infinity (.inf, or a number too large for a float, e.g. 1.0e+400)"


@pytest.mark.parametrize(("url", "expected"), [
    ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
    ("https://example.com:65535", "https://example.com:65535"),
    ("http://[::1]:1/v1", "http://[::1]:1/v1"),
])
def test_upstream_base_url_accepts(url, expected):
    assert upstream_base_url(url) == expected


@pytest.mark.parametrize(("url", "reason"), [
    ("ftp://x/v1", "must be an http(s) URL without query or fragment"),
    ("http:///v1", "must be an http(s) URL without query or fragment"),
    ("http://x/v1#f", "must be an http(s) URL without query or fragment"),
    ("http://[::1/v1", "must be an http(s) URL without query or fragment"),
    ("http://x:65536/v1", "the port must be a number in 1-65535"),
    ("http://x:-1/v1", "the port must be a number in 1-65535"),
    ("http://user:pw@x/v1", "must not carry credentials"),
    ("http://user@x/v1", "must not carry credentials"),
])
def test_upstream_base_url_refuses(url, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        upstream_base_url(url)


@pytest.mark.parametrize(("url", "env"), [
    ("http://bob:${PW}@127.0.0.1:8000/v1", {"PW": "hunter2"}),
    ("http://bob:hunter2@127.0.0.1:8000/v1", {}),
])
def test_credentials_in_base_url_are_refused_without_quoting_them(url, env):
    """Neither transport sends a URL's user:password (httpx's clients turn it into Basic
    auth, its transports do not), so the upstream would get no credentials, and
    `check-config` printed the URL, password and all."""
    with pytest.raises(ConfigError) as info:
        parse_config(f"upstreams:\n  local:\n    base_url: {url}\n", path="c.yaml", env=env)
    assert info.value.key_path == "upstreams.local.base_url" and "api_key" in info.value.reason
    assert "hunter2" not in str(info.value) and "bob" not in str(info.value)


@pytest.mark.parametrize("key", ["sk-hunter2\n", " sk-hunter2", "sk-hunter2\t", "sk-hun\x00ter2", "sk-hünter2",
                                 "sk-hunter2€"])
@pytest.mark.parametrize(("text", "key_path"), [
    ("server:\n  api_keys: ['${K}']\n", "server.api_keys[0]"),
    ("server:\n  api_keys: [{key: '${K}', name: a}]\n", "server.api_keys[0].key"),
    ("    api_key: ${K}\n", "upstreams.local.api_key"),
])
def test_a_key_that_cannot_travel_in_a_header_is_refused(key, text, key_path):
    """A key from a secret file often ends in a newline. A proxy key that a client cannot
    send (white space at either end is not part of a header value, a line break cannot be
    sent, a non-ASCII one is read back as other characters) let no client in, and an
    upstream key such as this made every request fail: a 502 `upstream_unreachable`
    (a line break), or a 500 and a traceback (a character outside latin-1)."""
    with pytest.raises(ConfigError) as info:
        parse_config(UP + text, path="c.yaml", env={"K": key})
    assert info.value.key_path == key_path and "ASCII" in info.value.reason
    assert "hunter2" not in str(info.value)


def test_missing_secret_names_variable_not_value():
    with pytest.raises(ConfigError) as info:
        parse_config(UP + "server:\n  api_keys: ['${PROXY_KEY}']\n", path="c.yaml", env={})
    assert str(info.value) == "c.yaml:5: server.api_keys[0]: environment variable PROXY_KEY is not set"


def test_empty_upstream_api_key_means_none():
    config = parse_config(UP + "    api_key: ${VLLM_KEY:-}\n", env={})
    assert config.upstreams["local"].api_key is None


@pytest.mark.parametrize("word", ["off", "on", "yes", "no"])
def test_yaml11_booleans_stay_strings(word):
    text = UP + f"policies:\n  p:\n    refusal: {word}\n    response: {{action: off}}\n"
    policy = parse_config(text, env={}).policies["p"]
    assert (policy.refusal, policy.response.action) == (word, "off")


def test_merge_keys_are_supported():
    config = parse_config(UP + textwrap.dedent("""\
        policies:
          base: &base
            refusal: Nope.
            prompt: {threshold: 0.7}
          derived:
            <<: *base
            on_guard_error: allow
        """), env={})
    assert config.policies["derived"] == Policy("derived", "Nope.", "allow", PromptStage(threshold=0.7))


def test_a_merged_key_is_overridden_by_the_mapping_that_merges_it():
    """YAML's merge key: the mapping's own keys win over merged ones, and of several merged
    mappings the first listed wins (this was refused as a duplicate key)."""
    config = parse_config(UP + textwrap.dedent("""\
        policies:
          a:
            refusal: Nope.
            response: &cut {action: cut, threshold: 0.5, check_every: 8}
          c:
            response: &c
              <<: [{threshold: 0.8, check_every: 4}, *cut]
              threshold: 0.7
          d:
            response: *c
        """), env={})
    assert config.policies["c"].response == ResponseStage(threshold=0.7, check_every=4)
    assert config.policies["d"].response == config.policies["c"].response  # the aliased mapping read again


def test_a_key_written_twice_beside_a_merge_is_still_a_duplicate():
    with pytest.raises(ConfigError, match="duplicate key") as info:
        parse_config(UP + "policies:\n  a: &a {refusal: x}\n  b:\n    <<: *a\n    refusal: y\n    refusal: z\n", env={})
    assert info.value.key_path == "policies.b.refusal" and info.value.line == 9


def test_load_config_reads_a_file_and_names_it(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE)
    assert load_config(path, env={}).path == str(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml", env={})


def test_reference_config_loads():
    config = load_config(REFERENCE, env={"VLLM_API_KEY": "x", "PROXY_KEY": "y", "TEAM_A_KEY": "z"})
    assert config.routes[-1].prefix == "/v1" and config.routes[-1].policy == "default"
    assert "steer" in {p.prompt.action for p in config.policies.values()}


def test_the_reference_shows_every_key():
    """docs/config.reference.yaml says it shows every key: each field of the config's
    sections appears there as a key (steer's two under their YAML names)."""
    import dataclasses

    from policies.config import GuardConfig, ServerConfig, Upstream

    text = REFERENCE.read_text()
    yaml_names = {"steer_from": "from", "steer_message": "system_message"}
    for section in (ServerConfig, Upstream, GuardConfig, PromptStage, ResponseStage):
        for f in dataclasses.fields(section):
            assert f"{yaml_names.get(f.name, f.name)}:" in text, f"{section.__name__}.{f.name}"


def test_textwrap_helper_matches_file_lines():
    # The helper dedents; line numbers must still be those of the dedented text.
    with pytest.raises(ConfigError) as info:
        parse(textwrap.indent(UP + "bogus: 1\n", "    "))
    assert (info.value.key_path, info.value.line) == ("bogus", 4)


@pytest.mark.parametrize("value,expect", [("null", None), ("1", 1), ("3", 3)])
def test_guard_threads(value, expect):
    config = parse_config(f"upstreams: {{up: {{base_url: 'http://x/v1'}}}}\nguard: {{threads: {value}}}\n")
    assert config.guard.threads == expect


@pytest.mark.parametrize("text,expect", [("", 64), ("guard: {stream_slots: 8}\n", 8)])
def test_guard_stream_slots(text, expect):
    assert parse_config("upstreams: {up: {base_url: 'http://x/v1'}}\n" + text).guard.stream_slots == expect


def test_guard_compile_steps():
    base = "upstreams: {up: {base_url: 'http://x/v1'}}\n"
    assert parse_config(base).guard.compile_steps is False
    assert parse_config(base + "guard: {compile_steps: true}\n").guard.compile_steps is True
    with pytest.raises(ConfigError, match="guard.compile_steps"):
        parse_config(base + "guard: {compile_steps: sometimes}\n")


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "many"])
def test_guard_stream_slots_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError, match="guard.stream_slots"):
        parse_config(f"upstreams: {{up: {{base_url: 'http://x/v1'}}}}\nguard: {{stream_slots: {value}}}\n")


def test_guard_threads_must_be_positive():
    with pytest.raises(ConfigError, match="guard.threads"):
        parse_config("upstreams: {up: {base_url: 'http://x/v1'}}\nguard: {threads: 0}\n")


@pytest.mark.parametrize("key,text,expect", [
    ("prefix_cache_mb", "", 256.0), ("prefix_cache_mb", "0", 0.0), ("prefix_cache_mb", "1.5", 1.5),
    ("prefix_cache_scope", "", "key"), ("prefix_cache_scope", "shared", "shared"), ("prefix_cache_scope", "key", "key")])
def test_guard_prefix_cache_options(key, text, expect):
    guard = f"guard: {{{key}: {text}}}\n" if text else ""
    assert getattr(parse_config("upstreams: {up: {base_url: 'http://x/v1'}}\n" + guard).guard, key) == expect


@pytest.mark.parametrize("key,value", [("prefix_cache_mb", v) for v in ("-1", "many", ".inf", "true")]
                         + [("prefix_cache_scope", v) for v in ("route", "null", "1", "Key")])
def test_guard_prefix_cache_options_are_checked(key, value):
    """The size is a number at least 0; the scope is key or shared."""
    with pytest.raises(ConfigError, match=f"guard.{key}"):
        parse_config(f"upstreams: {{up: {{base_url: 'http://x/v1'}}}}\nguard: {{{key}: {value}}}\n")


@pytest.mark.parametrize("text,expect", [("", "max"), ("guard: {emoji: read}\n", "read"),
                                         ("guard: {emoji: max}\n", "max")])
def test_guard_emoji_rule(text, expect):
    assert parse_config("upstreams: {up: {base_url: 'http://x/v1'}}\n" + text).guard.emoji == expect


@pytest.mark.parametrize("value", ["strip", "null", "true", "Max", "[max]"])
def test_guard_emoji_rule_is_checked(value):
    with pytest.raises(ConfigError, match="guard.emoji"):
        parse_config(f"upstreams: {{up: {{base_url: 'http://x/v1'}}}}\nguard: {{emoji: {value}}}\n")


@pytest.mark.parametrize(("text", "memory", "unknown"), [
    ("", 64.0, "forward"),
    ("server: {responses_memory_mb: 0}\npolicies: {default: {unknown_previous_response: block}}\n", 0.0, "block"),
    ("server: {responses_memory_mb: 0.5}\npolicies: {default: {unknown_previous_response: forward}}\n", 0.5,
     "forward")])
def test_responses_memory_and_unknown_previous_responses(text, memory, unknown):
    config = parse_config("upstreams: {up: {base_url: 'http://x/v1'}}\n" + text)
    assert (config.server.responses_memory_mb, config.policies["default"].unknown_previous_response) == (
        memory, unknown)


def test_rerank_is_read_with_a_cutting_response_stage():
    config = parse_config(UP + "policies:\n  p:\n    rerank: {n: 4, select: first_safe}\n")
    assert config.policies["p"].rerank == Rerank(4, "first_safe") and config.policies["p"].response.action == "cut"


@pytest.mark.parametrize("prefix", ["/v1;team=a", "/team-a_1~x/v1", "/a:b@c/v1", "/a+b,c!$&'()*=/v1"])
def test_a_prefix_may_hold_any_character_a_path_carries_as_it_is(prefix):
    """RFC 3986's pchar less '%': what a client sends unescaped, so what the router sees."""
    config = parse_config(UP + f"routes:\n  - {{prefix: \"{prefix}\", upstream: local, policy: default}}\n", env={})
    assert config.routes[0].prefix == prefix


@pytest.mark.parametrize("kind", ["list", "merge"])
def test_aliases_that_expand_without_bound_are_refused_quickly(kind):
    """Nine aliases of nine aliases ... ("billion laughs") expanded to 9**9 values: a
    reload of such a file hung the proxy, which parses on its event loop."""
    lines = [UP.rstrip("\n")]
    if kind == "list":
        lines.append("x0: &a0 [l, l, l, l, l, l, l, l, l]")
        lines += [f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    else:
        lines.append("x0: &a0 {l: 1}")
        lines += [f"x{i}: &a{i} {{<<: [" + ", ".join([f"*a{i - 1}"] * 9) + "]}" for i in range(1, 10)]
    started = time.monotonic()
    with pytest.raises(ConfigError, match="expands to over"):
        parse_config("\n".join(lines) + "\n", path="cfg.yaml", env={})
    assert time.monotonic() - started < 5


def test_a_document_nested_past_pythons_recursion_limit_is_a_config_error():
    """PyYAML's composer recursed into a RecursionError: a traceback from check-config and
    serve, and out of a reload (whose poll then stopped for good)."""
    with pytest.raises(ConfigError, match="nested too deeply") as info:
        parse_config(UP + "x: " + "[" * 5000 + "]" * 5000 + "\n", path="cfg.yaml", env={})
    assert info.value.file == "cfg.yaml"
