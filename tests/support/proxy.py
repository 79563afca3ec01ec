"""Start siren-proxy itself on loopback, from YAML text and an optional scorer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from policies.config import parse_config
from policies.reload import ConfigHolder
from proxy.app import build_app

from .servers import LiveServer

UNGUARDED_POLICY = """
policies:
  open:
    prompt: {action: off}
    response: {action: off}
"""


def unguarded_yaml(base_url: str, *, server: str = "", upstream_extra: str = "") -> str:
    return f"""
server:
  max_body_bytes: 65536
{server}
upstreams:
  up:
    base_url: {base_url}
{upstream_extra}
{UNGUARDED_POLICY}
routes:
  - {{prefix: /v1, upstream: up, policy: open}}
"""


@contextlib.contextmanager
def running_proxy(yaml_text: str, scorer=None) -> Iterator[LiveServer]:
    holder = ConfigHolder(parse_config(yaml_text))
    with LiveServer(build_app(holder, scorer)) as server:
        yield server
