from __future__ import annotations

import math

import pytest

from policies.config import PromptStage, ResponseStage
from policies.decisions import (Decision, decide_continuation, decide_prompt, decide_response, headers_for,
                                merged_headers)
from tests.policies.cases import load_example

STEER = PromptStage(action="steer", threshold=0.6, steer_from=0.3, steer_message="Be safe.")
BELOW, AT, ABOVE = 0.5 - 1e-9, 0.5, 0.5 + 1e-9

# (stage, score, action, crossed)
PROMPT = [
    (PromptStage("refuse"), 0.0, "allow", False),
    (PromptStage("refuse"), BELOW, "allow", False),
    (PromptStage("refuse"), AT, "refuse", True),
    (PromptStage("refuse"), ABOVE, "refuse", True),
    (PromptStage("refuse"), 1.0, "refuse", True),
    (PromptStage("block"), BELOW, "allow", False),
    (PromptStage("block"), AT, "block", True),
    (PromptStage("flag"), BELOW, "flag", False),
    (PromptStage("flag"), AT, "flag", True),
    (PromptStage("shadow"), BELOW, "shadow", False),
    (PromptStage("shadow"), AT, "shadow", True),
    (PromptStage("off"), 1.0, "allow", False),
    (PromptStage("off"), None, "allow", False),
    (STEER, 0.0, "allow", False),
    (STEER, 0.3 - 1e-9, "allow", False),
    (STEER, 0.3, "steer", False),
    (STEER, 0.45, "steer", False),
    (STEER, 0.6 - 1e-9, "steer", False),
    (STEER, 0.6, "refuse", True),
    (STEER, 1.0, "refuse", True),
    (PromptStage("refuse", threshold=0.0), 0.0, "refuse", True),
    (PromptStage("refuse", threshold=1.0), 1.0 - 1e-9, "allow", False),
    (PromptStage("refuse", threshold=1.0), 1.0, "refuse", True),
    (PromptStage(action="steer", threshold=0.5, steer_from=0.0, steer_message="m"), 0.0, "steer", False),
]


@pytest.mark.parametrize(("stage", "score", "action", "crossed"), PROMPT)
@pytest.mark.parametrize("on_guard_error", ["block", "allow"])
def test_decide_prompt(stage, score, action, crossed, on_guard_error):
    decision = decide_prompt(stage, score, on_guard_error=on_guard_error)
    expected_score = None if stage.action == "off" else score
    assert decision == Decision("prompt", action, expected_score, stage.threshold, crossed, None)


@pytest.mark.parametrize(("stage", "action", "crossed"), [
    (PromptStage("refuse"), "refuse", True), (PromptStage("block"), "block", True),
    (PromptStage("flag"), "flag", True), (PromptStage("shadow"), "shadow", True),
    (STEER, "refuse", True), (PromptStage("off"), "allow", False)])
def test_a_continuation_of_a_cut_reply_crosses_unscored(stage, action, crossed):
    """It does what a harmful prompt does, with no score and the reason why."""
    decision = decide_continuation(stage, "previous_response_cut")
    reason = "previous_response_cut" if crossed else None
    assert decision == Decision("prompt", action, None, stage.threshold, crossed, None, reason)
    assert decision.forwards == (action in ("flag", "shadow", "allow"))


RESPONSE = [
    (ResponseStage("cut"), 0.0, "allow", False),
    (ResponseStage("cut"), BELOW, "allow", False),
    (ResponseStage("cut"), AT, "cut", True),
    (ResponseStage("cut", threshold=0.9), 0.9 - 1e-9, "allow", False),
    (ResponseStage("cut", threshold=0.9), 0.9, "cut", True),
    (ResponseStage("flag"), BELOW, "flag", False),
    (ResponseStage("flag"), AT, "flag", True),
    (ResponseStage("shadow"), BELOW, "shadow", False),
    (ResponseStage("shadow"), 1.0, "shadow", True),
    (ResponseStage("off"), 1.0, "allow", False),
]


@pytest.mark.parametrize(("stage", "score", "action", "crossed"), RESPONSE)
def test_decide_response(stage, score, action, crossed):
    decision = decide_response(stage, score, on_guard_error="block")
    expected_score = None if stage.action == "off" else score
    assert decision == Decision("response", action, expected_score, stage.threshold, crossed, None)


# (stage action, on_guard_error, action out): guard failures
PROMPT_ERRORS = [
    ("refuse", "block", "guard_error"),
    ("refuse", "allow", "allow"),
    ("block", "block", "guard_error"),
    ("block", "allow", "allow"),
    ("steer", "block", "guard_error"),
    ("steer", "allow", "allow"),
    ("flag", "block", "guard_error"),
    ("flag", "allow", "flag"),
    ("shadow", "block", "shadow"),
    ("shadow", "allow", "shadow"),
]
FAILURES = [  # (score, error, guard_error recorded)
    (None, "timeout", "timeout"),
    (0.1, "overloaded", "overloaded"),
    (None, None, "no score"),
    (math.nan, None, "invalid score"),
    (1.5, None, "invalid score"),
    (-0.1, None, "invalid score"),
    (True, None, "invalid score"),
]


@pytest.mark.parametrize(("action", "on_guard_error", "out"), PROMPT_ERRORS)
@pytest.mark.parametrize(("score", "error", "recorded"), FAILURES)
def test_prompt_guard_errors(action, on_guard_error, out, score, error, recorded):
    stage = STEER if action == "steer" else PromptStage(action)
    decision = decide_prompt(stage, score, on_guard_error=on_guard_error, error=error)
    assert decision == Decision("prompt", out, None, stage.threshold, False, recorded)


@pytest.mark.parametrize(("action", "on_guard_error", "out"), [
    ("cut", "block", "guard_error"),
    ("cut", "allow", "allow"),
    ("flag", "block", "guard_error"),
    ("flag", "allow", "flag"),
    ("shadow", "block", "shadow"),
    ("shadow", "allow", "shadow"),
])
@pytest.mark.parametrize(("score", "error", "recorded"), FAILURES)
def test_response_guard_errors(action, on_guard_error, out, score, error, recorded):
    decision = decide_response(ResponseStage(action), score, on_guard_error=on_guard_error, error=error)
    assert decision == Decision("response", out, None, 0.5, False, recorded)


def test_off_stages_ignore_guard_errors():
    assert decide_prompt(PromptStage("off"), None, on_guard_error="block", error="down").action == "allow"
    assert decide_response(ResponseStage("off"), None, on_guard_error="block", error="down").action == "allow"


@pytest.mark.parametrize(("action", "forwards"), [
    ("allow", True), ("flag", True), ("shadow", True), ("steer", True),
    ("refuse", False), ("block", False), ("cut", False), ("guard_error", False),
])
def test_forwards(action, forwards):
    assert Decision("prompt", action, 0.5, 0.5, True).forwards is forwards


# (decision, policy, headers)
HEADERS = [
    (Decision("prompt", "flag", 0.73456, 0.5, True), None,
     {"x-siren-stage": "prompt", "x-siren-decision": "flagged", "x-siren-score": "0.7346", "x-siren-threshold": "0.5000"}),
    (Decision("prompt", "flag", 0.1, 0.5, False), "kids",
     {"x-siren-stage": "prompt", "x-siren-decision": "allowed", "x-siren-score": "0.1000", "x-siren-threshold": "0.5000",
      "x-siren-policy": "kids"}),
    (Decision("prompt", "flag", None, 0.5, False, "timeout"), None,
     {"x-siren-stage": "prompt", "x-siren-decision": "guard_error", "x-siren-threshold": "0.5000"}),
    (Decision("response", "cut", 0.99999, 0.9, True), None,
     {"x-siren-stage": "response", "x-siren-decision": "cut", "x-siren-score": "1.0000", "x-siren-threshold": "0.9000"}),
    (Decision("prompt", "steer", 0.4, 0.6, False), None,
     {"x-siren-stage": "prompt", "x-siren-decision": "steer", "x-siren-score": "0.4000", "x-siren-threshold": "0.6000"}),
]


@pytest.mark.parametrize(("decision", "policy", "headers"), HEADERS)
def test_headers_for(decision, policy, headers):
    assert headers_for(decision, policy=policy) == headers


def test_headers_never_carry_the_guard_error_text():
    decision = decide_prompt(PromptStage("flag"), None, on_guard_error="allow", error="CUDA OOM at /secret/path")
    assert "secret" not in str(headers_for(decision))


def _flag(stage: str, score: float | None, crossed: bool = False, error: str | None = None) -> dict[str, str]:
    return headers_for(Decision(stage, "flag", score, 0.5, crossed, error))


PROMPT_FLAGGED = _flag("prompt", 0.9, True)
PROMPT_ALLOWED = _flag("prompt", 0.1)
PROMPT_FAILED = _flag("prompt", None, error="timeout")  # flag under on_guard_error: allow
REPLY_FLAGGED = _flag("response", 0.8, True)
REPLY_ALLOWED = _flag("response", 0.2)
REPLY_FAILED = _flag("response", None, error="timeout")

# (prompt stage's headers, response stage's, what the client gets): one decision, the
# prompt's unless it was allowed (or absent) and the response's says more
MERGED = [
    (PROMPT_FLAGGED, REPLY_ALLOWED, PROMPT_FLAGGED),
    (PROMPT_FLAGGED, REPLY_FLAGGED, PROMPT_FLAGGED),
    (PROMPT_FLAGGED, REPLY_FAILED, PROMPT_FLAGGED),
    (PROMPT_FAILED, REPLY_FLAGGED, PROMPT_FAILED),
    (PROMPT_ALLOWED, REPLY_ALLOWED, PROMPT_ALLOWED),
    (PROMPT_ALLOWED, REPLY_FLAGGED, REPLY_FLAGGED),
    (PROMPT_ALLOWED, REPLY_FAILED, REPLY_FAILED),
    ({}, REPLY_ALLOWED, REPLY_ALLOWED),
    (PROMPT_ALLOWED, {}, PROMPT_ALLOWED),
    ({}, {}, {}),
]


@pytest.mark.parametrize(("prompt", "response", "merged"), MERGED)
def test_merged_headers_tell_one_decision(prompt, response, merged):
    assert merged_headers(prompt, response) == merged


# The example config must mean what it says: (policy, stage, score, action)
EXAMPLE = [
    ("default", "prompt", 0.49, "allow"),
    ("default", "prompt", 0.5, "refuse"),
    ("default", "response", 0.49, "allow"),
    ("default", "response", 0.5, "cut"),
    ("redteam", "prompt", 0.0, "shadow"),
    ("redteam", "prompt", 1.0, "shadow"),
    ("redteam", "response", 0.5, "allow"),
    ("redteam", "response", 0.89, "allow"),
    ("redteam", "response", 0.9, "cut"),
    ("redteam", "response", 0.99, "cut"),
]


@pytest.mark.parametrize(("policy", "stage", "score", "action"), EXAMPLE)
def test_example_config_decisions(policy, stage, score, action):
    p = load_example().policies[policy]
    decide = decide_prompt if stage == "prompt" else decide_response
    assert decide(getattr(p, stage), score, on_guard_error=p.on_guard_error).action == action


def test_example_fails_closed_on_guard_errors():
    config = load_example()
    default, redteam = config.policies["default"], config.policies["redteam"]
    assert decide_prompt(default.prompt, None, on_guard_error=default.on_guard_error, error="x").action == "guard_error"
    assert decide_prompt(redteam.prompt, None, on_guard_error=redteam.on_guard_error, error="x").action == "shadow"
    assert decide_response(redteam.response, None, on_guard_error=redteam.on_guard_error, error="x").action == "guard_error"
    assert config.policies["redteam"].response.holdback == 0 < config.policies["default"].response.holdback
