"""Decisions on scores: what a stage does with one score, and the headers that say so.

Boundary: a score crosses when `score >= threshold` (the reference's `is_harmful`).
Steer: `steer_from <= score < threshold` steers, `score >= threshold` refuses.

Actions a prompt decision can carry:
    allow        forward untouched
    refuse       answer with the policy's refusal, finish_reason "content_filter"; upstream not called
    block        HTTP 400, OpenAI error body, code "content_filter"
    flag         forward, add `x-siren-*` headers (`crossed` says whether it crossed)
    shadow       forward untouched; log and count only (`crossed` is what would have happened)
    steer        forward with the policy's safety system message added
    guard_error  the guard failed and on_guard_error is block: HTTP 503, code
                 "guard_unavailable" before headers are out, an in-band error event after
Actions a response decision can carry: allow, cut, flag, shadow, guard_error.

A prompt that continues a reply the proxy cut, refused or did not read to its end
(`decide_continuation`) crosses without being scored: the model would read on from the
whole of that reply, which the upstream stored and the client never got past the guard.
So does a stored reply the proxy cut, read back later (`decide_withheld`).

A guard failure is `error` set, or a score that is None, NaN or outside [0, 1]: a
guard that answers nonsense has failed, and failing closed is the default. Stages whose
action never gates traffic (`shadow`, `off`) forward on a guard error whatever
`on_guard_error` says; `flag` stays `flag` under `allow` so the headers can say the guard
failed; every other action yields `guard_error` under `block` and `allow` under `allow`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from policies.config import PromptStage, ResponseStage

ALLOW, REFUSE, BLOCK, FLAG, SHADOW, STEER, CUT, GUARD_ERROR = (
    "allow", "refuse", "block", "flag", "shadow", "steer", "cut", "guard_error")


@dataclass(frozen=True)
class Decision:
    """`score` is None only when the stage is off, the guard failed (`guard_error` set),
    or the stage decided without a score (`reason` set)."""

    stage: str  # "prompt" | "response"
    action: str
    score: float | None
    threshold: float
    crossed: bool
    guard_error: str | None = None
    reason: str | None = None  # why a stage decided without a score, e.g. "previous_response_cut"

    @property
    def forwards(self) -> bool:
        """Whether the request goes on (prompt) or the text reaches the client (response)."""
        return self.action not in (REFUSE, BLOCK, CUT, GUARD_ERROR)


def _failure(score: float | None, error: str | None) -> str | None:
    if error is not None:
        return error
    if score is None:
        return "no score"
    if isinstance(score, bool) or not isinstance(score, (int, float)) or math.isnan(score) or not 0.0 <= score <= 1.0:
        return "invalid score"
    return None


def _on_error(stage: str, action: str, threshold: float, failure: str, on_guard_error: str) -> Decision:
    if action in (SHADOW, "off"):
        out = SHADOW if action == SHADOW else ALLOW
    elif on_guard_error == "allow":
        out = FLAG if action == FLAG else ALLOW
    else:
        out = GUARD_ERROR
    return Decision(stage, out, None, threshold, False, failure)


def decide_prompt(stage: PromptStage, score: float | None, *, on_guard_error: str, error: str | None = None) -> Decision:
    if stage.action == "off":
        return Decision("prompt", ALLOW, None, stage.threshold, False)
    failure = _failure(score, error)
    if failure is not None:
        return _on_error("prompt", stage.action, stage.threshold, failure, on_guard_error)
    score = float(score)
    crossed = score >= stage.threshold
    if stage.action in (FLAG, SHADOW):
        action = stage.action
    elif stage.action == STEER:
        action = REFUSE if crossed else STEER if score >= stage.steer_from else ALLOW
    else:  # refuse | block
        action = stage.action if crossed else ALLOW
    return Decision("prompt", action, score, stage.threshold, crossed)


def decide_continuation(stage: PromptStage, reason: str) -> Decision:
    """The prompt decision of a request that continues a reply the proxy cut or refused
    (`reason`, e.g. "previous_response_cut"): it crosses, whatever its own text scores, so
    each action does what it does with a harmful prompt (`steer` refuses)."""
    if stage.action == "off":
        return Decision("prompt", ALLOW, None, stage.threshold, False)
    action = REFUSE if stage.action == STEER else stage.action
    return Decision("prompt", action, None, stage.threshold, True, reason=reason)


def decide_withheld(stage: ResponseStage, reason: str) -> Decision:
    """The response decision on a stored reply the proxy cut, read back (`reason`, e.g.
    "stored_response_cut"): it crosses unscored, as it did when it was cut."""
    if stage.action == "off":
        return Decision("response", ALLOW, None, stage.threshold, False)
    return Decision("response", stage.action, None, stage.threshold, True, reason=reason)


def decide_response(stage: ResponseStage, score: float | None, *, on_guard_error: str, error: str | None = None) -> Decision:
    if stage.action == "off":
        return Decision("response", ALLOW, None, stage.threshold, False)
    failure = _failure(score, error)
    if failure is not None:
        return _on_error("response", stage.action, stage.threshold, failure, on_guard_error)
    score = float(score)
    crossed = score >= stage.threshold
    action = stage.action if stage.action in (FLAG, SHADOW) or crossed else ALLOW
    return Decision("response", action, score, stage.threshold, crossed)


def headers_for(decision: Decision, *, policy: str | None = None) -> dict[str, str]:
    """The `x-siren-*` headers describing a decision (for `flag`; harmless on any other).

    `x-siren-decision` is "flagged" or "allowed" for a flag decision, "guard_error" on a
    guard failure, else the action. The guard's error text is never sent to the client.
    """
    if decision.guard_error is not None:
        verdict = "guard_error"
    elif decision.action == FLAG:
        verdict = "flagged" if decision.crossed else "allowed"
    else:
        verdict = decision.action
    headers = {
        "x-siren-stage": decision.stage,
        "x-siren-decision": verdict,
        "x-siren-threshold": f"{decision.threshold:.4f}",
    }
    if decision.score is not None:
        headers["x-siren-score"] = f"{decision.score:.4f}"
    if policy is not None:
        headers["x-siren-policy"] = policy
    return headers


def flag_headers(decisions, *, policy: str | None = None) -> dict[str, str]:
    """`x-siren-*` of a stage that decided several choices (or conversations): the first
    `flag` decision that crossed, else the first `flag` decision; {} without one."""
    flagged = [d for d in decisions if d is not None and d.action == FLAG]
    if not flagged:
        return {}
    return headers_for(next((d for d in flagged if d.crossed), flagged[0]), policy=policy)


def invalid_score(score: object) -> str | None:
    """Why `score` is no guard verdict (None, NaN, outside [0, 1]), or None if it is one:
    the stages' own reading (`decide_prompt`, `decide_response`)."""
    return _failure(score, None)


def merged_headers(prompt: Mapping[str, str], response: Mapping[str, str]) -> dict[str, str]:
    """The `x-siren-*` headers of a reply both stages decided: one decision's, never a mix.

    The prompt stage's stand unless they are absent or say `allowed` and the response
    stage's say more (`flagged`, `guard_error`). A stream's headers leave before its reply
    is scored, so they are the prompt's; a whole reply says the same, and adds the reply's
    verdict only where the prompt's had nothing to say.
    """
    says_more = bool(response) and (not prompt or (prompt.get("x-siren-decision") == "allowed"
                                             and response.get("x-siren-decision") != "allowed"))
    return dict(response if says_more else prompt)
