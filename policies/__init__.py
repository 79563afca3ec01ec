"""Policies are data: config.yaml parsed into frozen objects, and pure decisions on scores.

Nothing here imports torch or httpx, so every rule is table-tested without a model.

Modules: `config` (schema, `load_config`, `parse_config`), `routing` (`match_route`,
`routing_table`), `auth` (`authenticate`), `extract` (what text is scored),
`decisions` (`decide_prompt`, `decide_response`, `headers_for`), `reload`
(`ConfigHolder`), `cli` (`check-config`). Errors: see `policies.errors`.
"""

from policies.config import Config, Policy, PromptStage, ResponseStage, Route, load_config, parse_config
from policies.errors import ConfigError, PolicyError, RequestError, RequestShapeError, UnsafePathError

__all__ = [
    "Config", "ConfigError", "Policy", "PolicyError", "PromptStage", "RequestError",
    "RequestShapeError", "ResponseStage", "Route", "UnsafePathError", "load_config", "parse_config",
]
