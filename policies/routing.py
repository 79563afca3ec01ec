"""Which route serves a request, and the routing table `check-config` prints.

Routes are tried in order and the first match wins. A route matches when the path is its
prefix or lies under it by whole segments (`/v1` matches `/v1/chat/completions`, never
`/v1x`; each segment in any case and without matrix parameters, as endpoints are known:
`policies.config.route_rest`), and each of its conditions that is set holds: the body's `model` matches the
glob (a request without a string `model` fails a model condition), the header is present
with a value matching the glob (a header given twice with two values is refused, not read
by its order), the request authenticated with the named API key.

Paths are checked before any matching: a path that could climb out of the prefix the
proxy appends to `upstream.base_url` (`.`/`..` segments, `//`, a backslash, `%2f`, `%2e`,
`%5c`, control characters) raises `UnsafePathError`. Pass the raw path (ASGI
`scope["raw_path"]`, latin-1 decoded, query string removed) so encoded forms are seen,
after `normalize_path`: `/v1/chat/%63ompletions` is `/v1/chat/completions` to an
upstream that decodes its path (uvicorn, vLLM), so it must be to routing and to the
guard's endpoint rules too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from fnmatch import fnmatchcase

from policies.config import Config, Policy, Route, Upstream, route_rest
from policies.errors import RoutingHeaderError, UnsafePathError

_ENCODED_UNSAFE = re.compile(r"%(?:2f|2e|5c|00)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# RFC 3986's unreserved characters but '.', whose escape `check_path` refuses
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_~")


def normalize_path(path: str) -> str:
    """`path` with percent-escapes of unreserved characters decoded (RFC 3986, 6.2.2.2):
    the same resource to any server, and the form routes and endpoints are matched in."""
    def decode(match: re.Match) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else match.group(0)

    return _ESCAPE.sub(decode, path) if "%" in path else path


@dataclasses.dataclass(frozen=True)
class RouteMatch:
    """`upstream_path` is the path after the prefix ("" or starting with "/")."""

    route: Route
    upstream: Upstream
    policy: Policy
    upstream_path: str

    @property
    def upstream_url(self) -> str:
        return self.upstream.base_url + self.upstream_path


def check_path(path: str) -> None:
    """Raise `UnsafePathError` unless `path` is a plain absolute path."""
    if not path.startswith("/"):
        raise UnsafePathError("the request path must start with '/'")
    if "//" in path or "\\" in path or _CONTROL.search(path):
        raise UnsafePathError("the request path contains '//', a backslash or a control character")
    if _ENCODED_UNSAFE.search(path):
        raise UnsafePathError("the request path contains an encoded '/', '.', '\\' or NUL")
    # `..;x` too: servers that strip matrix parameters (Tomcat, Spring) read it as `..`
    if any(segment.split(";", 1)[0] in (".", "..") for segment in path.split("/")):
        raise UnsafePathError("the request path contains a '.' or '..' segment")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """The header's value; `RoutingHeaderError` when it comes more than once with different
    values (read the first, and the order of two lines picked the route)."""
    values = {value for key, value in headers.items() if key.lower() == name}
    if len(values) > 1:
        count = sum(key.lower() == name for key, _ in headers.items())
        raise RoutingHeaderError(f"the header {name!r} is given {count} times with different values; "
                                 "routes read it, so send it once")
    return next(iter(values), None)


def route_matches(
    route: Route, path: str, *, model: str | None, headers: Mapping[str, str], api_key_name: str | None
) -> bool:
    if route_rest(route.prefix, path) is None:
        return False
    if route.model is not None and not (isinstance(model, str) and fnmatchcase(model, route.model)):
        return False
    if route.header_name is not None:
        value = _header(headers, route.header_name)
        if value is None or not fnmatchcase(value, route.header_value or "*"):
            return False
    return route.api_key is None or route.api_key == api_key_name


def match_route(
    config: Config,
    path: str,
    *,
    model: str | None = None,
    headers: Mapping[str, str] | None = None,
    api_key_name: str | None = None,
) -> RouteMatch | None:
    """The first route matching the request, or None (the proxy answers 404)."""
    check_path(path)
    headers = headers or {}
    for route in config.routes:
        if route_matches(route, path, model=model, headers=headers, api_key_name=api_key_name):
            rest = route_rest(route.prefix, path)
            return RouteMatch(route, config.upstreams[route.upstream], config.policies[route.policy], rest)
    return None


def model_route_passed_over(config: Config, match: RouteMatch, path: str, *, headers: Mapping[str, str],
                            api_key_name: str | None) -> Route | None:
    """For a request that names no model: the first route before `match` that it met in
    all but its `model` condition, or None. vLLM serves a request without `model` with the
    model it serves, so such a request passed over the route meant for that model."""
    for route in config.routes:
        if route is match.route:
            return None
        if route.model is not None and route_matches(dataclasses.replace(route, model=None), path, model=None,
                                                     headers=headers, api_key_name=api_key_name):
            return route
    return None


def _conditions(route: Route) -> str:
    parts = []
    if route.model is not None:
        parts.append(f"model={route.model}")
    if route.header_name is not None:
        parts.append(f"{route.header_name}: {route.header_value}")
    if route.api_key is not None:
        parts.append(f"api_key={route.api_key}")
    return ", ".join(parts) or "-"


def _policy_summary(policy: Policy) -> str:
    p, r = policy.prompt, policy.response
    prompt = "off" if p.action == "off" else f"{p.action}@{p.threshold:g}"
    if p.action == "steer":
        prompt += f" (steer from {p.steer_from:g})"
    response = "off" if r.action == "off" else f"{r.action}@{r.threshold:g} every {r.check_every} hold {r.holdback}"
    rerank = "" if policy.rerank is None else f"; rerank {policy.rerank.select} of {policy.rerank.n}"
    return (f"prompt {prompt} [{p.scope}, {p.mode}]; response {response}; on_guard_error {policy.on_guard_error}; "
            f"unguarded endpoints {policy.unguarded_endpoints}; moderations {policy.moderations}{rerank}; "
            f"unknown previous responses {policy.unknown_previous_response}")


def routing_table(config: Config) -> str:
    """Routes in match order, then the policies they use; never prints a secret."""
    rows = [("#", "name", "prefix", "conditions", "upstream", "policy")]
    for i, route in enumerate(config.routes):
        upstream = config.upstreams[route.upstream]
        rows.append((str(i), route.name, route.prefix, _conditions(route),
                     f"{route.upstream} ({upstream.base_url})", route.policy))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("(no match: 404)")
    lines.append("")
    used = dict.fromkeys(route.policy for route in config.routes)
    lines.extend(f"policy {name}: {_policy_summary(config.policies[name])}" for name in used)
    if config.server.auth_required:
        lines.append(f"auth: {len(config.server.api_keys)} API key(s): "
                     + ", ".join(k.name for k in config.server.api_keys))
    else:
        lines.append("auth: off (server.api_keys is empty)")
    lines.append(_front_summary(config.server))
    lines.append("cors: off (preflights forwarded; the upstream's policy applies)" if not config.server.cors_origins
                 else "cors: " + ", ".join(config.server.cors_origins))
    memory = config.server.responses_memory_mb
    partition = "per API key and upstream" if config.server.auth_required else "per upstream"
    lines.append("responses memory: off" if memory == 0 else f"responses memory: {memory:g} MiB, {partition}")
    lines.append(_guard_summary(config))
    return "\n".join(lines)


def _front_summary(server) -> str:
    """The front door's bounds (`proxy.front`) and a body's."""
    def bound(value) -> str:
        return "unbounded" if value is None else f"{value:g}"
    body = "unbounded" if server.body_timeout is None else f"{server.body_timeout:g} s"
    return (f"front door: heads {server.max_head_bytes} bytes within {server.head_timeout:g} s, body silences "
            f"{body}, keep-alive {server.keep_alive_timeout:g} s, connections {bound(server.max_connections)} "
            f"({bound(server.max_connections_per_client)} per client)")


def guard_needed(config: Config) -> bool:
    """Whether any policy that a route uses scores anything (so the model must load)."""
    used = {route.policy for route in config.routes}
    return any(p.prompt.action != "off" or p.response.action != "off" or p.rerank is not None
               or p.moderations == "guard" for name, p in config.policies.items() if name in used)


def _guard_summary(config: Config) -> str:
    """What `serve` loads for the guard, and how its prefix cache is shared."""
    if not guard_needed(config):
        return "guard: not loaded (no route scores text; a reload that makes one score loads it)"
    g = config.guard
    artifact = g.artifact or "the embedded default head"
    if g.prefix_cache_mb == 0:
        cache = "prefix cache off"
    else:
        shared = "per API key" if g.prefix_cache_scope == "key" and config.server.auth_required else "shared"
        cache = f"prefix cache {g.prefix_cache_mb:g} MiB, {shared}"
    return f"guard: {artifact}, device {g.device}, dtype {g.dtype}; {cache}"
