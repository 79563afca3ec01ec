"""A reply read whole (not streamed), guarded: each choice scored as the response stage
reads it, and one that crosses replaced by the policy's refusal (`WholeReply.guard`); or,
with `rerank`, the safest of the upstream's n candidates returned (`WholeReply.rank`).

The texts are scored from the cached prompt (`WholeReply.score_choices`): the first on
the prompt stage's session, the others on sessions that open once its prefill has
scored, so they take the prompt from the guard's prefix cache and run only their own
tokens, `CHOICE_SESSIONS` at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

import httpx
from starlette.responses import Response

from policies.decisions import CUT, GUARD_ERROR, decide_response, flag_headers, invalid_score

from .errors import GuardUnavailable
from . import rerank
from .relay import cleanup, transport_error
from .scorer import StreamSession
from .shapes import choice_texts, refuse_choice
from .upstream import response_headers

if TYPE_CHECKING:
    from .guarding import GuardedCall

logger = logging.getLogger(__name__)

# A Responses reply still being generated has one of these statuses (a background one)
UNFINISHED = ("queued", "in_progress")
# A whole reply's choices (or safest-of-n's candidates) are scored on at most this many
# guard sessions at once: as many as the worker packs into one round by default
# (`guard.max_batch_size`), and a bound on the prompt cache copies held for one reply.
CHOICE_SESSIONS = 16


class WholeReply:
    """The response stage of one `proxy.guarding.GuardedCall` for a reply read whole."""

    def __init__(self, call: GuardedCall) -> None:
        self.call = call
        self.body: dict | None = None  # the reply `guard` read (a cut keeps its id: `refuse_choice`)
        self.texts: list[tuple[int, str]] | None = None  # what `guard` read of each choice
        self.cut = False  # `guard` replaced a choice with the refusal

    async def guard(self, data: bytes) -> tuple[bytes, dict[str, str]]:
        """A non-streamed response: score prompt + each choice; replace what crosses."""
        call = self.call
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        if isinstance(body, dict):
            self.body = body
        choices = self.texts = choice_texts(call.endpoint, body) if isinstance(body, dict) else None
        if choices is None:  # not a completion we can read: nothing to score, fail per policy
            self.unreadable()
            return data, {}
        if call.endpoint == "responses" and body.get("status") in UNFINISHED and not any(t for _, t in choices):
            return data, {}  # nothing generated yet (a background response, "queued"): read when read back
        started = time.perf_counter()
        scores, error = [None] * len(choices), None
        try:
            if choices:
                scores = await self.score_choices(choices)
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("guard failed on a response: %s", error)
        ms = (time.perf_counter() - started) * 1000
        call.exchange.timed("response", ms / 1000)
        decisions = []
        changed = False
        for (index, _), score in zip(choices, scores):
            decision = decide_response(call.policy.response, score, on_guard_error=call.policy.on_guard_error,
                                       error=error)
            call.exchange.decided(decision, ms, choice=index)
            if decision.action == GUARD_ERROR:
                raise GuardUnavailable("the safety guard failed while checking the response")
            if decision.action == CUT:
                refuse_choice(call.endpoint, call.payload, call.policy.refusal, body, index)
                changed = True
            decisions.append(decision)
        headers = flag_headers(decisions, policy=call.policy.name)  # the first choice that crossed, else the first
        self.cut = changed
        return (json.dumps(body, ensure_ascii=False).encode() if changed else data), headers

    def unreadable(self) -> None:
        """A reply the guard cannot read (`choice_texts` is None) may carry text it would
        never score: a guard failure, which meets `on_guard_error` (raised when it blocks)."""
        call = self.call
        decision = decide_response(call.policy.response, None, on_guard_error=call.policy.on_guard_error,
                                   error="the upstream response is not a completion the guard can read")
        call.exchange.decided(decision, 0.0)
        if decision.action == GUARD_ERROR:
            raise GuardUnavailable("the upstream response could not be checked by the safety guard")

    async def rank(self, response: httpx.Response, headers: dict[str, str]) -> Response:
        """Safest-of-n (`rerank`): the upstream's candidates, read whole, scored; the one
        `rerank.select` picks is returned (streamed if the client asked for a stream),
        with every score in `x-siren-rerank-scores`."""
        call = self.call
        data = await read_whole(response)
        passthrough = response_headers(response.headers.multi_items(), keep_length=False, guarded=True)
        try:
            body = json.loads(data) if response.status_code == 200 else None
        except ValueError:
            body = None
        texts = choice_texts(call.endpoint, body) if isinstance(body, dict) else None
        if texts is None and response.status_code == 200:
            self.unreadable()
        if not texts:  # an upstream error, or nothing to rank: the client gets it as it came
            call.write_audit()
            return Response(data, status_code=response.status_code, headers=dict(passthrough))
        started = time.perf_counter()
        try:
            scores = await self.score_choices(texts)
            # a NaN or out-of-range score is a guard that failed, as the stages read it
            error = next((f"candidate {i}: {why}" for i, why in enumerate(map(invalid_score, scores)) if why), None)
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            decision = decide_response(call.policy.response, None, on_guard_error=call.policy.on_guard_error,
                                       error=error)
            call.exchange.decided(decision, 0.0)
            if decision.action == GUARD_ERROR:
                raise GuardUnavailable("the safety guard failed while ranking candidates") from None
            scores = [0.0] * len(texts)  # allow: rank blind, i.e. the first candidate
        ms = (time.perf_counter() - started) * 1000
        call.exchange.timed("rerank", ms / 1000)
        chosen = rerank.select(scores, call.policy.response.threshold, call.policy.rerank.select)
        for (index, _), score in zip(texts, scores):
            call.exchange.scored(index, 0, score)
        decision = decide_response(call.policy.response, scores[chosen] if chosen is not None else max(scores),
                                   on_guard_error=call.policy.on_guard_error)
        call.exchange.decided(decision, ms)
        call.write_audit()
        completion = rerank.chosen_completion(body, chosen, call.policy, call.payload)
        headers = {**headers, "x-siren-rerank": f"{'none' if chosen is None else chosen}/{len(scores)}",
                   "x-siren-rerank-scores": ",".join(f"{s:.4f}" for s in scores)}
        if call.payload.get("stream") is True:
            return Response(rerank.as_stream(completion, call.payload), media_type="text/event-stream",
                            headers={**dict(passthrough), "content-type": "text/event-stream", **headers})
        return Response(json.dumps(completion, ensure_ascii=False).encode(), media_type="application/json",
                        headers={**dict(passthrough), **headers})

    async def score_choices(self, choices: list[tuple[int, str]]) -> list[float]:
        """Each of a whole reply's (index, text) scored as the response stage reads it:
        `prompt + "\\n" + text` (`include_prompt`), else the text alone.

        With the prompt, on guard sessions: the first is the prompt stage's (its prompt
        already prefilled), or one opened now whose prefill is awaited, so the prompt is in
        the guard's prefix cache before the others open; they take it and run only their
        own text's tokens (`guard.prefixes`), and the worker packs their appends into
        shared forwards, `CHOICE_SESSIONS` at a time. So n choices, or safest-of-n's n
        candidates, cost one prompt and n responses, not n prompts. Without the prompt,
        one batch. A completions request's several prompts: each choice with the prompt it
        answers (`score_pairs`)."""
        call = self.call
        texts = [text for _, text in choices]
        if not call.shares_prompt():
            include = call.policy.response.include_prompt
            return await score_pairs(call.scorer, [(call.choice_prompt(i) if include else None, text)
                                                   for i, text in choices], call.cache_salt)
        sessions = [call.take_session() or call.scorer.stream(call.prompt, cache_salt=call.cache_salt)]
        scores: list[float] = []
        try:
            if len(texts) > 1:
                await sessions[0].prompt_score()
            for start in range(0, len(texts), CHOICE_SESSIONS):  # bounded: each holds a copy of the prompt's cache
                group = texts[start : start + CHOICE_SESSIONS]
                while len(sessions) < len(group):  # one at a time: each opened is closed, even if the next fails
                    sessions.append(call.scorer.stream(call.prompt, cache_salt=call.cache_salt))
                scores += await asyncio.gather(*(s.append(text) for s, text in zip(sessions, group)))
                await _close_all(sessions)
            return scores
        finally:
            await _close_all(sessions)


async def gather_groups(call, items) -> list:
    """`call(item)` for each of `items`, `CHOICE_SESSIONS` at a time (each may hold a guard
    session's cache); every call of a group is awaited, so none is left running, before
    the group's first failure, if any, is raised."""
    out: list = []
    for start in range(0, len(items), CHOICE_SESSIONS):
        results = await asyncio.gather(*map(call, items[start : start + CHOICE_SESSIONS]), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        out += results
    return out


async def score_pairs(scorer, pairs: list[tuple[str | None, str]], cache_salt: str | None) -> list[float]:
    """(prompt, text) pairs scored as `prompt + "\\n" + text` (the text alone where the
    prompt is None): each pair with a prompt on a guard session of its own, which
    continues from that prompt's prefill in the guard's prefix cache (where the prompt
    stage left it), and the rest in one full-text batch."""
    if scorer is None:
        raise RuntimeError("no guard is configured")

    async def on_session(pair: tuple[str, str]) -> float:
        session = scorer.stream(pair[0], cache_salt=cache_salt)
        try:
            return await session.append(pair[1])
        finally:
            with cleanup():
                await session.aclose()

    scores: dict[int, float] = {}
    plain = [k for k, (prompt, _) in enumerate(pairs) if not prompt]  # an empty prompt has no prefill
    if plain:
        scores.update(zip(plain, await scorer.score_many([pairs[k] for k in plain])))
    prompted = [k for k, (prompt, _) in enumerate(pairs) if prompt]
    scores.update(zip(prompted, await gather_groups(on_session, [pairs[k] for k in prompted])))
    return [scores[k] for k in range(len(pairs))]


async def read_whole(response: httpx.Response) -> bytes:
    """A non-streamed upstream body, read whole; a break is a 502/504 like any other."""
    try:
        return await response.aread()
    except httpx.HTTPError as exc:
        raise transport_error(exc) from exc
    finally:
        with cleanup():
            await response.aclose()


async def _close_all(sessions: list[StreamSession]) -> None:
    """Close and forget every session in `sessions`: one that fails to close is logged,
    and the rest are still closed."""
    while sessions:
        session = sessions.pop()
        with cleanup():
            try:
                await session.aclose()
            except Exception as exc:  # noqa: BLE001 - the verdict stands; the worker frees it on its own close
                logger.warning("guard session did not close: %s: %s", type(exc).__name__, exc)
