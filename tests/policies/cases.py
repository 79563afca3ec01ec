"""Shared cases for the policies tests: the issue's example config and a parse helper."""

from __future__ import annotations

import textwrap

from policies.config import Config, parse_config

# The example, verbatim: a strict default route and a red-team route at its own prefix.
EXAMPLE = """\
upstreams:
  local:
    base_url: http://127.0.0.1:8000/v1
policies:
  default:
    prompt:   {threshold: 0.5, action: refuse}
    response: {threshold: 0.5, action: cut, check_every: 16, holdback: 16}
  redteam:
    prompt:   {action: shadow}
    response: {threshold: 0.9, action: cut, check_every: 16, holdback: 0}
routes:
  - {prefix: /redteam/v1, upstream: local, policy: redteam}
  - {prefix: /v1, upstream: local, policy: default}
"""


def parse(text: str, **env: str) -> Config:
    return parse_config(textwrap.dedent(text), path="test.yaml", env=env)


def load_example() -> Config:
    return parse_config(EXAMPLE, path="config.yaml", env={})
