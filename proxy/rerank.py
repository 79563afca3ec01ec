"""Safest-of-n (SRR at the proxy): ask for n candidates, return the safest as n = 1.

For a chat request with `n` 1 or absent, on a route whose policy sets
`rerank: {n, select}`, the proxy asks the upstream for `n` candidates in one
non-streamed request (vLLM and OpenAI honour `n`), scores prompt + candidate for all
of them in one guard batch, and answers with one of them as an ordinary n = 1
completion:

- `select: safest`: the lowest-scoring candidate;
- `select: first_safe`: the first candidate (by index) under the threshold.

If no candidate is under the response threshold the answer is the policy's refusal
(`finish_reason: "content_filter"`). Usage is the upstream's, for all n candidates: that
is what the request cost. A streaming client gets the chosen candidate as a stream once
it is chosen (role chunk, content with its logprobs, finish chunk, usage if asked,
`[DONE]`), so its time to first token is the time to generate every candidate: the
price of choosing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from policies.config import Policy, Rerank

from .shapes import CONTENT_FILTER, refused_json, usage_chunk, wants_usage
from .sse import DONE, encode_json


def applies(policy: Policy, endpoint: str, payload: Mapping) -> bool:
    return (policy.rerank is not None and endpoint == "chat/completions"
            and payload.get("n", 1) in (1, None))


def upstream_body(payload: Mapping, rerank: Rerank) -> bytes:
    request = {k: v for k, v in payload.items() if k not in ("stream", "stream_options")}
    return json.dumps({**request, "n": rerank.n}).encode()


def select(scores: Sequence[float], threshold: float, how: str) -> int | None:
    """The index of the chosen candidate, or None when none is under the threshold."""
    safe = [i for i, score in enumerate(scores) if score < threshold]
    if not safe:
        return None
    if how == "first_safe":
        return safe[0]
    return min(safe, key=lambda i: scores[i])


def chosen_completion(body: dict, candidate: int | None, policy: Policy, payload: Mapping) -> dict:
    """The upstream's n-candidate completion reduced to the chosen one (index 0)."""
    if candidate is None:
        refused = refused_json("chat/completions", payload, policy.refusal)
        return {**refused, **{k: body[k] for k in ("id", "created", "model", "usage") if k in body}}
    choice = {**body["choices"][candidate], "index": 0}
    return {**body, "choices": [choice]}


# what a chosen candidate's message streams as, a reasoning model's thinking first (and
# the legacy functions API's call)
_DELTA_FIELDS = ("reasoning", "reasoning_content", "content", "tool_calls", "function_call", "refusal")


def as_stream(completion: Mapping, payload: Mapping) -> bytes:
    base = {k: completion[k] for k in ("id", "created", "model") if k in completion}
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    delta = {k: v for k, v in message.items() if k in _DELTA_FIELDS and v is not None}
    if isinstance(delta.get("tool_calls"), list):
        delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(delta["tool_calls"])]

    def chunk(d: dict, finish: str | None, logprobs: object = None) -> bytes:
        return encode_json({**base, "object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": d, "finish_reason": finish, "logprobs": logprobs}]})

    # the log-probabilities, if the client asked for them, go with the text they describe
    out = chunk({"role": "assistant", "content": ""}, None) + chunk(delta, None, choice.get("logprobs"))
    out += chunk({}, choice.get("finish_reason") or CONTENT_FILTER)
    if wants_usage(payload) and isinstance(completion.get("usage"), Mapping):
        out += usage_chunk("chat/completions", base, completion["usage"])
    return out + DONE
