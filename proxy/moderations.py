"""`POST /v1/moderations` answered by the guard (a policy's `moderations: guard`).

OpenAI's moderation API is how many applications check a text before they use it: a
user's message, a retrieved document, a tool's output. vLLM and llama.cpp do not serve
it, so behind this proxy such calls would fail; with `moderations: guard` the proxy
answers them itself, with the same SIREN score the prompt stage reads, and the upstream
is never called.

The request is OpenAI's: `input` is a string, a list of strings (one result each), or a
list of content parts (`{"type": "text", "text": ...}`), which together make one input
and one result. Image parts are refused with a 400: the guard reads no images, and a
verdict on the text alone would pass an image it never saw.

The answer is OpenAI's shape with one category, SIREN's: `categories.harmful` (the score
crossed the policy's `prompt.threshold`), `category_scores.harmful` (P(harmful)) and
`category_applied_input_types.harmful` (`["text"]`). OpenAI's own categories are left
out, since the guard does not tell them apart; its SDK reads them as None. A guard that
fails answers 503, whatever `on_guard_error` says: there is nothing to let through.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping

from starlette.responses import Response

from policies.config import Policy
from policies.decisions import ALLOW, FLAG, GUARD_ERROR, Decision, invalid_score

from .endpoints import folded
from .guarding import QUEUE_FULL, check_prompt_sizes
from .errors import BadRequest, GuardUnavailable, Overloaded
from .records import AuditLog, Exchange
from .scorer import Scorer, ScorerBusy

logger = logging.getLogger(__name__)

ENDPOINT = "moderations"
CATEGORY = "harmful"
MAX_INPUTS = 128
DEFAULT_MODEL = "siren"


def moderation_endpoint(method: str, url: str) -> bool:
    """Whether `method url` is a moderation request, however the route mounts it."""
    return method == "POST" and folded(url)[-1:] == (ENDPOINT,)


def inputs(payload: Mapping) -> list[str]:
    """The texts to score, one per result; `BadRequest` names what is wrong."""
    value = payload.get("input")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise BadRequest("'input' must be a string, a non-empty list of strings, or a non-empty list of "
                         "content parts", param="input")
    if all(isinstance(item, str) for item in value):
        if len(value) > MAX_INPUTS:
            raise BadRequest(f"'input' has {len(value)} strings; at most {MAX_INPUTS} are scored in one request",
                             param="input")
        return list(value)
    if any(isinstance(item, str) for item in value):  # strings and something else
        i = next(i for i, item in enumerate(value) if not isinstance(item, str))
        raise BadRequest(f"'input[{i}]' must be a string, as the other items of 'input' are (a list of strings; "
                         "content parts come in a list of parts alone)", param=f"input[{i}]")
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            raise BadRequest("this guard reads text only: 'input' has an image part, which it cannot judge",
                             param=f"input[{i}]", code="unsupported_input")
        else:
            raise BadRequest(f"'input[{i}]' must be a string, or a content part {{\"type\": \"text\", "
                             "\"text\": ...}} in a list of parts", param=f"input[{i}]")
    return ["\n".join(texts)]


async def answer(scorer: Scorer | None, payload: Mapping, policy: Policy, exchange: Exchange,
                 audit: AuditLog | None = None, max_prompt_bytes: int | None = None) -> Response:
    texts = inputs(payload)
    single = not isinstance(payload.get("input"), list) or len(texts) == 1
    check_prompt_sizes(texts, max_prompt_bytes, lambda i: "input" if single else f"input[{i}]")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", param="model")
    if scorer is None:
        raise GuardUnavailable("no guard is configured to answer moderations")
    started = time.perf_counter()
    threshold = policy.prompt.threshold
    busy = False
    try:
        scores = await scorer.score_many([(text, None) for text in texts])
        # As the stages read a score: None, NaN or outside [0, 1] is a guard that failed.
        error = next((f"input {i}: {why}" for i, why in enumerate(map(invalid_score, scores)) if why), None)
    except ScorerBusy:
        error, busy = QUEUE_FULL, True
    except Exception as exc:  # noqa: BLE001 - any guard failure is this request's 503
        error = f"{type(exc).__name__}: {exc}"
        logger.warning("guard failed on a moderation: %s", error)
    seconds = time.perf_counter() - started
    exchange.timed(ENDPOINT, seconds)
    if error is not None:  # recorded as a stage's guard failure is, then the 503
        exchange.decided(Decision(ENDPOINT, GUARD_ERROR, None, threshold, False, error), seconds * 1000)
        if audit is not None:
            audit.write(exchange)
        if busy:
            raise Overloaded("the safety guard is saturated; retry shortly", headers={"retry-after": "1"})
        raise GuardUnavailable("the safety guard failed on this moderation")
    results = []
    for i, score in enumerate(scores):
        score = float(score)
        crossed = score >= threshold
        exchange.decided(Decision(ENDPOINT, FLAG if crossed else ALLOW, score, threshold, crossed),
                         seconds * 1000, choice=i if len(scores) > 1 else None)
        results.append({"flagged": crossed, "categories": {CATEGORY: crossed},
                        "category_scores": {CATEGORY: score},
                        "category_applied_input_types": {CATEGORY: ["text"]}})
    if audit is not None:
        audit.write(exchange)
    body = {"id": f"modr-{uuid.uuid4().hex}", "model": model or DEFAULT_MODEL, "results": results}
    return Response(json.dumps(body).encode(), media_type="application/json")

