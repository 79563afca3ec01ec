"""config.yaml as frozen typed objects, and the loader that builds them.

Invariants of a `Config` that `parse_config` returns (so the proxy never re-checks them):
every route names an existing upstream and policy, and an existing `server.api_keys`
entry when it has an `api_key` condition; no route is shadowed by an earlier one; every
threshold is in [0, 1]; a steer band satisfies 0 <= steer_from < threshold; upstream
base URLs are http(s) with a host, a port (if any) in 1-65535, no credentials and no trailing slash;
route prefixes start with "/", have no trailing slash (except "/" itself) and no
`.`/`..` segments, `//` or `%`.

The policy named `default` always exists: when `policies` does not define it, it is the
built-in `Policy(name="default")` with every field at its default. When `routes` is
omitted and there is exactly one upstream, the routes are `[{prefix: /v1, upstream: <it>,
policy: default}]`.

Secrets (`ApiKey.key`, `Upstream.api_key`) are `repr=False`, and errors never quote an
interpolated value. This module is longer than most: it is the whole schema in one place,
each section's dataclass next to the function that builds it.
"""

from __future__ import annotations

import errno
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from policies._source import REQUIRED, Context, Section, load_tree
from policies.errors import ConfigError

PROMPT_ACTIONS = ("refuse", "block", "flag", "shadow", "steer", "off")
RESPONSE_ACTIONS = ("cut", "flag", "shadow", "off")
PROMPT_SCOPES = ("last_user", "conversation", "conversation_with_system")
PROMPT_MODES = ("sequential", "parallel")
GUARD_ERROR_MODES = ("block", "allow")
RERANK_SELECTS = ("safest", "first_safe")
UNGUARDED_ENDPOINTS = ("block", "forward")
MODERATIONS = ("forward", "guard")
UNKNOWN_PREVIOUS_RESPONSE = ("forward", "block")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CACHE_SCOPES = ("key", "shared")  # guard.prefix_cache_scope
EMOJI_RULES = ("max", "read")  # guard.emoji (guard.siren.EMOJI_RULES; the proxy never imports torch)
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
MAX_MEMORY_MB = 1024 * 1024  # server.responses_memory_mb: 1 TiB, any machine's bound, so bytes stay an int
MAX_HEAD_BYTES = 1024 * 1024  # server.max_head_bytes: a head is held whole in memory, per connection
MAX_CHOICES = 128  # OpenAI's bound on `n`: a guarded request's choices, and safest-of-n's candidates
_DEVICE = re.compile(r"^(?:auto|cpu|cuda|cuda:\d+)$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# What a request path carries unescaped (RFC 3986's pchar and '/', less '%', which prefixes
# refuse): routes match the raw path, so a prefix with anything else could never match.
_PATH_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/")
# A key as it travels in `Authorization: Bearer <key>`: visible ASCII, spaces inside only
_SENDABLE_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
_UNSENDABLE = ("must be printable ASCII with no white space at either end (a trailing newline from a secret "
               "file?): no HTTP header can carry it as it is")


def _sendable(key: str) -> bool:
    """Whether `key` arrives in a header as written: a header value loses white space at
    either end, cannot hold a line break, and non-ASCII bytes are read back as latin-1."""
    return _SENDABLE_KEY.fullmatch(key) is not None


def _frozen_map(items: Mapping) -> Mapping:
    return types.MappingProxyType(dict(items))


@dataclass(frozen=True)
class ApiKey:
    """A proxy API key clients present as `Authorization: Bearer <key>`."""

    name: str
    key: str = field(repr=False)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 10 * 1024 * 1024
    api_keys: tuple[ApiKey, ...] = ()
    max_concurrent_streams: int = 1024
    request_timeout: float | None = None
    # Seconds streams in flight get to end at shutdown (SIGTERM, Ctrl-C) before they are
    # ended with an in-band error (read at start-up)
    shutdown_timeout: float = 10.0
    audit_log: str | None = None
    log_level: str = "info"
    # UTF-8 bytes of one prompt the guard reads (what a request makes it score from scratch
    # is bounded by it: a token is at least a byte); None: no bound
    max_prompt_bytes: int | None = 64 * 1024
    # Responses turns remembered so that a request chaining from one is scored with its
    # conversation (`proxy.memory`); 0: off
    responses_memory_mb: float = 64.0
    # The front door (`proxy.front`), read for each new connection: a request head's bound
    # in bytes and in seconds, how long an idle connection stays open, and how many
    # connections may be open at once, in all and from one client address (None: no bound)
    max_head_bytes: int = 64 * 1024
    head_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_connections: int | None = None
    max_connections_per_client: int | None = None
    # Seconds a request body may go without a byte before it is refused (408); None: no bound
    body_timeout: float | None = 60.0
    # Origins whose browser pages may call the proxy (`proxy.cors`), lower case, or "*";
    # empty: the proxy does no CORS (preflights are forwarded)
    cors_origins: tuple[str, ...] = ()

    @property
    def auth_required(self) -> bool:
        """Auth is on exactly when at least one API key is configured."""
        return bool(self.api_keys)


@dataclass(frozen=True)
class Upstream:
    name: str
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    max_connections: int = 1000


@dataclass(frozen=True)
class GuardConfig:
    artifact: str | None = None
    backbone: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 16
    max_wait_ms: float = 2.0
    max_queue: int = 1024
    trust_remote_code: bool = False
    threads: int | None = None  # torch threads of the guard's worker; None: one less than the cores
    stream_slots: int = 64  # streaming windows that take static (CUDA-graph) steps at once
    compile_steps: bool = False  # fuse static steps with torch.compile at load (GPU; ~70 s)
    prefix_cache_mb: float = 256.0  # scored prefixes streaming sessions continue from; 0: off
    prefix_cache_scope: str = "key"  # key: entries are not shared across API keys; shared: they are
    emoji: str = "max"  # max: read as a person does, and also without emoji, the higher counts; read: as written


@dataclass(frozen=True)
class PromptStage:
    """`steer_from`/`steer_message` are set iff action == "steer", then 0 <= steer_from < threshold."""

    action: str = "refuse"
    threshold: float = 0.5
    scope: str = "last_user"
    mode: str = "sequential"
    steer_from: float | None = None
    steer_message: str | None = None


@dataclass(frozen=True)
class ResponseStage:
    """holdback >= check_every guarantees no text scored unsafe reaches the client."""

    action: str = "cut"
    threshold: float = 0.5
    check_every: int = 16
    holdback: int = 16
    include_prompt: bool = True
    end_all_choices: bool = False


@dataclass(frozen=True)
class Rerank:
    n: int
    select: str = "safest"


@dataclass(frozen=True)
class Policy:
    name: str
    refusal: str = DEFAULT_REFUSAL
    on_guard_error: str = "block"
    prompt: PromptStage = PromptStage()
    response: ResponseStage = ResponseStage()
    rerank: Rerank | None = None
    unguarded_endpoints: str = "block"  # endpoints that generate text the guard does not read
    moderations: str = "forward"  # `guard`: POST moderations answered by the guard (`proxy.moderations`)
    # A Responses request that continues turns the proxy does not know (a `previous_response_id`
    # it did not guard or no longer remembers, a `conversation`): forwarded, scored on its
    # input alone; or refused with 403 `unknown_previous_response`
    unknown_previous_response: str = "forward"


@dataclass(frozen=True)
class Route:
    """Conditions that are None always match; `header_name` is lower-case."""

    name: str
    prefix: str
    upstream: str
    policy: str
    model: str | None = None
    header_name: str | None = None
    header_value: str | None = None
    api_key: str | None = None

    @property
    def unconditional(self) -> bool:
        return self.model is None and self.header_name is None and self.api_key is None


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    upstreams: Mapping[str, Upstream]
    guard: GuardConfig
    policies: Mapping[str, Policy]
    routes: tuple[Route, ...]
    path: str | None = None


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Config:
    """Read and parse a config file; unreadable files are `ConfigError`s too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config: {exc.__class__.__name__}: {exc}", file=str(path)) from None
    return parse_config(text, path=str(path), env=os.environ if env is None else env)


def check_paths(config: Config) -> None:
    """The paths `serve` opens at start-up, checked without creating anything, so that
    `check-config` and `serve` agree: an audit log that cannot be appended to, an artifact
    that names a local directory which is not one (`serve` would start with a failed guard,
    every guarded request a 503). `ConfigError`s naming the key."""
    audit = config.server.audit_log
    problem = None if audit is None else _unwritable(audit)
    if problem is not None:
        raise ConfigError(f"cannot open {audit!r}: {os.strerror(problem)}", file=config.path,
                          key_path="server.audit_log")
    artifact = config.guard.artifact
    # Local as `guard.siren.resolve_artifact` reads it: what exists, or starts like a path.
    if artifact is not None and (os.path.exists(artifact) or artifact.startswith((".", "/", "~"))) \
            and not os.path.isdir(artifact):
        raise ConfigError(f"{artifact!r} is not a directory: a local artifact path (a hub id has no leading "
                          "'/', '.' or '~')", file=config.path, key_path="guard.artifact")


def _unwritable(path: str) -> int | None:
    """Why a file could not be opened for appending (an errno), or None, creating nothing."""
    if os.path.isdir(path):
        return errno.EISDIR
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else errno.EACCES
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return errno.ENOTDIR if os.path.exists(folder) else errno.ENOENT
    return None if os.access(folder, os.W_OK | os.X_OK) else errno.EACCES


def parse_config(text: str, *, path: str | None = None, env: Mapping[str, str] = os.environ) -> Config:
    ctx = Context(file=path, env=env)
    tree = load_tree(text, path)
    if tree is None:
        raise ctx.error("the config is empty", "", None)
    top = Section(ctx, tree, "", getattr(tree, "line", None))
    server = _server(top.section("server") or Section(ctx, {}, "server", None))
    upstreams = _upstreams(top)
    guard = _guard(top.section("guard") or Section(ctx, {}, "guard", None))
    policies = {}
    for name, kp, line, value in top.entries("policies") or []:
        if not _sendable(name):  # a flagged reply names its policy in `x-siren-policy`
            raise ctx.error("a policy's name is sent in the x-siren-policy header, so it must be printable ASCII "
                            "with no white space at either end", kp, line)
        policies[name] = _policy(Section(ctx, value, kp, line), name)
    policies.setdefault("default", Policy(name="default"))
    routes = _routes(top, upstreams, policies, server)
    top.finish()
    return Config(server, _frozen_map(upstreams), guard, _frozen_map(policies), routes, path)


# What a browser sends as `Origin`: scheme://host[:port], nothing after it (no path, not
# even "/"), no user info. A listed origin with a path could never match.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#@\s]+")


def _origins(s: Section) -> tuple[str, ...]:
    origins = []
    for kp, line, item in s.items("cors_origins") or []:
        if not isinstance(item, str):
            raise s.ctx.error("expected a string", kp, line)
        origin = (s.ctx.interpolate(item, kp, line) if "${" in item else item).lower()
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise s.ctx.error(f"expected '*' or an origin as a browser sends it, scheme://host[:port] with no path "
                              f"or trailing '/'; got {item!r}", kp, line)
        origins.append(origin)
    return tuple(origins)


def _server(s: Section) -> ServerConfig:
    keys, names, values = [], set(), set()
    for i, (kp, line, item) in enumerate(s.items("api_keys") or []):
        if isinstance(item, dict):
            entry = Section(s.ctx, item, kp, line)
            key, name = entry.string("key"), entry.string("name", f"api_keys[{i}]")
            entry.finish()
        elif isinstance(item, str):
            key = s.ctx.interpolate(item, kp, line) if "${" in item else item
            name = f"api_keys[{i}]"
            if not key:
                raise s.ctx.error("must not be empty", kp, line)
        else:
            raise s.ctx.error("expected a string or {key, name}", kp, line)
        if not _sendable(key):
            raise s.ctx.error(_UNSENDABLE, f"{kp}.key" if isinstance(item, dict) else kp, line)
        if name in names:
            raise s.ctx.error(f"duplicate api key name {name!r}", kp, line)
        if key in values:
            raise s.ctx.error("duplicate api key value", kp, line)
        names.add(name), values.add(key)
        keys.append(ApiKey(name=name, key=key))
    d = ServerConfig()
    server = ServerConfig(
        host=s.string("host", d.host),
        port=s.integer("port", d.port, minimum=0, maximum=65535),
        max_body_bytes=s.integer("max_body_bytes", d.max_body_bytes, minimum=1),
        max_prompt_bytes=s.integer("max_prompt_bytes", d.max_prompt_bytes, minimum=1, nullable=True),
        api_keys=tuple(keys),
        max_concurrent_streams=s.integer("max_concurrent_streams", d.max_concurrent_streams, minimum=1),
        request_timeout=s.number("request_timeout", None, positive=True, nullable=True),
        shutdown_timeout=s.number("shutdown_timeout", d.shutdown_timeout, positive=True),
        audit_log=s.string("audit_log", None, nullable=True),
        log_level=s.choice("log_level", d.log_level, LOG_LEVELS),
        responses_memory_mb=s.number("responses_memory_mb", d.responses_memory_mb, minimum=0,
                                     maximum=MAX_MEMORY_MB),
        max_head_bytes=s.integer("max_head_bytes", d.max_head_bytes, minimum=1024, maximum=MAX_HEAD_BYTES),
        head_timeout=s.number("head_timeout", d.head_timeout, positive=True),
        keep_alive_timeout=s.number("keep_alive_timeout", d.keep_alive_timeout, positive=True),
        max_connections=s.integer("max_connections", None, minimum=1, nullable=True),
        max_connections_per_client=s.integer("max_connections_per_client", None, minimum=1, nullable=True),
        body_timeout=s.number("body_timeout", d.body_timeout, positive=True, nullable=True),
        cors_origins=_origins(s),
    )
    s.finish()
    return server


def _upstreams(top: Section) -> dict[str, Upstream]:
    entries = top.entries("upstreams")
    if not entries:
        raise top.ctx.error("at least one upstream is required", "upstreams", top.key_line("upstreams"))
    out = {}
    for name, kp, line, value in entries:
        u = Section(top.ctx, value, kp, line)
        try:
            base_url = upstream_base_url(u.string("base_url"))
        except ValueError as exc:
            raise u.error("base_url", f"{exc}; got {without_userinfo(u.value['base_url'])!r}") from None
        d = Upstream(name, base_url)
        api_key = u.string("api_key", None, nullable=True, nonempty=False)
        if api_key and not _sendable(api_key):
            raise u.error("api_key", _UNSENDABLE)
        out[name] = Upstream(
            name=name,
            base_url=base_url,
            api_key=api_key or None,  # `${KEY:-}` left empty means "pass the client's through"
            connect_timeout=u.number("connect_timeout", d.connect_timeout, positive=True),
            read_timeout=u.number("read_timeout", d.read_timeout, positive=True),
            max_connections=u.integer("max_connections", d.max_connections, minimum=1),
        )
        u.finish()
    return out


def upstream_base_url(url: str) -> str:
    """`url` as an upstream's `base_url`, its trailing `/` dropped; a `ValueError` saying
    why when it is not one. The one check for a config file's `base_url` and for
    `serve --upstream`, so the command line cannot start a proxy the file would refuse."""
    url = url.rstrip("/")
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment:
        raise ValueError("must be an http(s) URL without query or fragment")
    try:
        port = parts.port
    except ValueError:  # not a number, or over 65535
        port = 0
    if port == 0:
        raise ValueError("the port must be a number in 1-65535")
    if "@" in parts.netloc:  # neither transport sends it: the upstream would get no credentials
        raise ValueError("must not carry credentials (user:password@): they are not sent; set the upstream's api_key")
    return url


def without_userinfo(url: str) -> str:
    """`url` as an error may quote it: whatever comes before an '@' in its authority
    (credentials) is hidden."""
    return re.sub(r"^([^/?#]*//)?[^/?#]*@", r"\1***@", url)


def _guard(g: Section) -> GuardConfig:
    d = GuardConfig()
    device = g.string("device", d.device)
    if not _DEVICE.match(device):
        raise g.error("device", f"must be auto, cpu, cuda or cuda:N; got {g.value['device']!r}")
    guard = GuardConfig(
        artifact=g.string("artifact", None, nullable=True),
        backbone=g.string("backbone", None, nullable=True),
        device=device,
        dtype=g.choice("dtype", d.dtype, DTYPES),
        max_batch_size=g.integer("max_batch_size", d.max_batch_size, minimum=1),
        max_wait_ms=g.number("max_wait_ms", d.max_wait_ms, minimum=0),
        max_queue=g.integer("max_queue", d.max_queue, minimum=1),
        trust_remote_code=g.boolean("trust_remote_code", d.trust_remote_code),
        threads=g.integer("threads", None, minimum=1, nullable=True),
        stream_slots=g.integer("stream_slots", d.stream_slots, minimum=1),
        compile_steps=g.boolean("compile_steps", d.compile_steps),
        prefix_cache_mb=g.number("prefix_cache_mb", d.prefix_cache_mb, minimum=0),
        prefix_cache_scope=g.choice("prefix_cache_scope", d.prefix_cache_scope, CACHE_SCOPES),
        emoji=g.choice("emoji", d.emoji, EMOJI_RULES),
    )
    g.finish()
    return guard


def _policy(p: Section, name: str) -> Policy:
    prompt_section, response_section = p.section("prompt"), p.section("response")
    rerank_section = p.section("rerank")
    policy = Policy(
        name=name,
        refusal=p.string("refusal", DEFAULT_REFUSAL),
        on_guard_error=p.choice("on_guard_error", "block", GUARD_ERROR_MODES),
        prompt=_prompt(prompt_section) if prompt_section else PromptStage(),
        response=_response(response_section) if response_section else ResponseStage(),
        rerank=_rerank(rerank_section) if rerank_section else None,
        unguarded_endpoints=p.choice("unguarded_endpoints", "block", UNGUARDED_ENDPOINTS),
        moderations=p.choice("moderations", "forward", MODERATIONS),
        unknown_previous_response=p.choice("unknown_previous_response", "forward", UNKNOWN_PREVIOUS_RESPONSE),
    )
    if policy.rerank is not None and policy.response.action != "cut":
        # Safest-of-n refuses when every candidate crosses: a stage that only flags,
        # watches or is off must not change the reply
        raise p.error("rerank", f"needs response.action: cut (safest-of-n answers with the refusal when every "
                                f"candidate crosses); the response stage's action is {policy.response.action}")
    p.finish()
    return policy


def _prompt(s: Section) -> PromptStage:
    d = PromptStage()
    action = s.choice("action", d.action, PROMPT_ACTIONS)
    threshold = s.number("threshold", d.threshold, minimum=0.0, maximum=1.0)
    mode = s.choice("mode", d.mode, PROMPT_MODES)
    steer = s.section("steer")
    steer_from = steer_message = None
    if action == "steer":
        if steer is None:
            raise s.error("steer", "required when action is steer: {from: <score>, system_message: <text>}")
        if mode == "parallel":
            raise s.error("mode", "parallel cannot be combined with action: steer (the request is rewritten)")
        steer_from = steer.number("from", REQUIRED, minimum=0.0)
        if steer_from >= threshold:
            raise steer.error("from", f"must be < threshold ({threshold}); got {steer_from}")
        steer_message = steer.string("system_message")
        steer.finish()
    elif steer is not None:
        raise s.error("steer", f"only valid with action: steer (action is {action})")
    stage = PromptStage(action, threshold, s.choice("scope", d.scope, PROMPT_SCOPES), mode, steer_from, steer_message)
    s.finish()
    return stage


def _response(s: Section) -> ResponseStage:
    d = ResponseStage()
    stage = ResponseStage(
        action=s.choice("action", d.action, RESPONSE_ACTIONS),
        threshold=s.number("threshold", d.threshold, minimum=0.0, maximum=1.0),
        check_every=s.integer("check_every", d.check_every, minimum=1),
        holdback=s.integer("holdback", d.holdback, minimum=0),
        include_prompt=s.boolean("include_prompt", d.include_prompt),
        end_all_choices=s.boolean("end_all_choices", d.end_all_choices),
    )
    s.finish()
    return stage


def _rerank(s: Section) -> Rerank:
    rerank = Rerank(n=s.integer("n", REQUIRED, minimum=2, maximum=MAX_CHOICES), select=s.choice("select", "safest", RERANK_SELECTS))
    s.finish()
    return rerank


def _routes(top: Section, upstreams: Mapping[str, Upstream], policies: Mapping[str, Policy], server: ServerConfig) -> tuple[Route, ...]:
    items = top.items("routes")
    if items is None:
        if len(upstreams) != 1:
            raise top.ctx.error("required when there is more than one upstream", "routes", top.line)
        return (Route(name="default", prefix="/v1", upstream=next(iter(upstreams)), policy="default"),)
    if not items:
        raise top.error("routes", "at least one route is required")
    key_names = {k.name for k in server.api_keys}
    routes: list[Route] = []
    for i, (kp, line, item) in enumerate(items):
        r = Section(top.ctx, item, kp, line)
        route = _route(r, i, upstreams, policies, key_names)
        r.finish()
        for earlier in routes:
            if earlier.name == route.name:
                raise r.error("name", f"duplicate route name {route.name!r}")
            if shadows(earlier, route):
                raise top.ctx.error(
                    f"unreachable: every request it matches is matched first by route {earlier.name!r} "
                    f"(prefix {earlier.prefix})", kp, line)
        routes.append(route)
    return tuple(routes)


def _route(r: Section, i: int, upstreams: Mapping, policies: Mapping, key_names: set[str]) -> Route:
    prefix = r.string("prefix")
    if not prefix.startswith("/") or "//" in prefix or "%" in prefix or "\\" in prefix \
            or any(seg in (".", "..") for seg in prefix.split("/")):
        raise r.error("prefix", f"must start with '/' and contain no '//', '%', '\\\\', '.' or '..' segments; got {r.value['prefix']!r}")
    stray = next((char for char in prefix if char not in _PATH_CHARS and char != "%"), None)
    if stray is not None:
        raise r.error("prefix", f"{stray!r} is never in a request path as routes read it (a query or fragment is "
                      "not part of the path; a space or a non-ASCII letter comes percent-encoded), so this route "
                      f"would never match; got {r.value['prefix']!r}")
    if prefix != "/":
        prefix = prefix.rstrip("/")
    upstream, policy = r.string("upstream"), r.string("policy")
    if upstream not in upstreams:
        raise r.error("upstream", f"unknown upstream {r.value['upstream']!r} (known: {', '.join(upstreams)})")
    if policy not in policies:
        raise r.error("policy", f"unknown policy {r.value['policy']!r} (known: {', '.join(policies)})")
    header_name = header_value = None
    header = r.section("header")
    if header is not None:
        header_name = header.string("name")
        if not _HEADER_NAME.match(header_name):
            raise header.error("name", f"not a valid header name: {header.value['name']!r}")
        header_name, header_value = header_name.lower(), header.string("value", "*")
        header.finish()
    api_key = r.string("api_key", None, nullable=True)
    if api_key is not None and api_key not in key_names:
        raise r.error("api_key", f"no server.api_keys entry is named {r.value['api_key']!r}")
    return Route(
        name=r.string("name", f"routes[{i}]"), prefix=prefix, upstream=upstream, policy=policy,
        model=r.string("model", None, nullable=True), header_name=header_name,
        header_value=header_value, api_key=api_key,
    )


def route_rest(prefix: str, path: str) -> str | None:
    """What follows `prefix` in `path`, or None if `path` is not under it. Whole segments
    match, each in any case and without matrix parameters (`;x=1`), as the proxy knows
    endpoints (`proxy.endpoints.folded`): an upstream that ignores case (Express, ASP.NET)
    or strips `;params` (Tomcat, Spring) serves `/V1;x=1/chat/completions` as
    `/v1/chat/completions`, so a route must take it as that path's route."""
    if prefix == "/":
        return path
    want = [fold_segment(segment) for segment in prefix.split("/") if segment]
    parts = path.split("/")  # ["", segment, ...]: routed paths start with "/"
    if [fold_segment(segment) for segment in parts[1:len(want) + 1]] != want:
        return None
    rest = parts[len(want) + 1:]
    return "/" + "/".join(rest) if rest else ""


def fold_segment(segment: str) -> str:
    """A path segment as routes and endpoints are matched: any case, no matrix parameters."""
    return segment.split(";", 1)[0].lower()


def prefix_covers(outer: str, inner: str) -> bool:
    """Whether every path under `inner` is also under `outer` (`route_rest`)."""
    return route_rest(outer, inner) is not None


def shadows(earlier: Route, later: Route) -> bool:
    """True when every request `later` matches is matched by `earlier` first.

    Sound, not complete: a condition of `earlier` counts only when absent or written
    identically on `later` (globs are not compared for inclusion).
    """
    return (
        prefix_covers(earlier.prefix, later.prefix)
        and earlier.model in (None, later.model)
        and (earlier.header_name is None
             or (earlier.header_name, earlier.header_value) == (later.header_name, later.header_value))
        and earlier.api_key in (None, later.api_key)
    )
