"""Safest-of-n: the proxy asks for n candidates and returns the one the guard ranks safest."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from proxy.rerank import select
from tests.proxy.rawhttp import RawUpstream
from tests.support.proxy import running_proxy
from tests.support.scorers import KeywordScorer


@pytest.mark.parametrize("scores,how,expect", [
    ([0.9, 0.2, 0.1], "safest", 2),
    ([0.9, 0.2, 0.1], "first_safe", 1),
    ([0.9, 0.7], "safest", None),
    ([0.5, 0.49], "first_safe", 1),  # 0.5 crosses (>= threshold)
    ([0.1], "safest", 0),
])
def test_select(scores, how, expect):
    assert select(scores, 0.5, how) == expect


def config(url: str, how: str = "safest", prompt: str = "{action: off}") -> str:
    return f"""
upstreams:
  up: {{base_url: {url}}}
policies:
  p:
    refusal: "no."
    prompt: {prompt}
    response: {{action: cut, threshold: 0.5}}
    rerank: {{n: 3, select: {how}}}
routes:
  - {{prefix: /v1, upstream: up, policy: p}}
"""


def ask(proxy, script: str, **extra):
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk", max_retries=0,
                           default_headers={"x-script": script})
    with client:
        return client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], **extra)


def test_safest_candidate_is_returned_as_n1(scripted):
    url, recorder = scripted
    scorer = KeywordScorer()
    with running_proxy(config(url), scorer) as proxy:
        raw = ask(proxy, "text:a BOMB|a borderline one|a calm one")
    sent = recorder.requests[-1]["body"]
    reply = raw.parse()
    assert sent["n"] == 3 and "stream" not in sent
    assert [c.message.content for c in reply.choices] == ["a calm one"]
    assert reply.choices[0].index == 0
    assert raw.headers["x-siren-rerank"] == "2/3"
    assert raw.headers["x-siren-rerank-scores"] == "0.9900,0.4000,0.0100"
    assert reply.usage.completion_tokens == 18  # the upstream's own usage, for all 3 candidates
    # the candidates continue the prompt's session (opened as the request came) and two
    # more opened after its prefill, so the guard's prefix cache runs the prompt once
    assert scorer.calls == ["hi"]
    assert [s.text for s in scorer.sessions] == ["hi\na BOMB", "hi\na borderline one", "hi\na calm one"]


def test_first_safe(scripted):
    url, _ = scripted
    with running_proxy(config(url, "first_safe"), KeywordScorer()) as proxy:
        reply = ask(proxy, "text:a BOMB|a borderline one|a calm one").parse()
    assert reply.choices[0].message.content == "a borderline one"


def test_all_candidates_unsafe_is_the_refusal(scripted):
    url, _ = scripted
    with running_proxy(config(url), KeywordScorer()) as proxy:
        reply = ask(proxy, "text:BOMB one|BOMB two").parse()
    assert reply.choices[0].message.content == "no."
    assert reply.choices[0].finish_reason == "content_filter"


def streamed(url: str, **extra) -> list:
    """The chunks a streaming client gets of "a BOMB" and "a calm one", ranked."""
    with running_proxy(config(url), KeywordScorer()) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk", max_retries=0,
                               default_headers={"x-script": "text:a BOMB|a calm one"})
        with client:
            return list(client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True, **extra))


def test_streaming_client_gets_the_chosen_candidate_streamed(scripted):
    url, recorder = scripted
    chunks = streamed(url, stream_options={"include_usage": True})
    assert recorder.requests[-1]["body"].get("stream") is None
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a calm one"
    assert chunks[-1].usage.total_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_steered_prompt_is_still_reranked(scripted, stream):
    """`steer` rewrites the request: the rewritten one still asks for n candidates, not
    streamed (it went with the client's `n` and `stream`, so one candidate was "ranked",
    and a streaming client's reply, an event stream, was a guard failure)."""
    url, recorder = scripted
    prompt = '{action: steer, threshold: 0.8, steer: {from: 0.3, system_message: "Be careful."}}'
    with running_proxy(config(url, prompt=prompt), KeywordScorer()) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk", max_retries=0,
                               default_headers={"x-script": "text:a BOMB|a calm one"})
        with client:
            raw = client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "a borderline question"}], stream=stream)
            reply = raw.parse()
            text = ("".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream
                    else reply.choices[0].message.content)
    sent = recorder.requests[-1]["body"]
    assert sent["messages"][0] == {"role": "system", "content": "Be careful."}
    assert sent["n"] == 3 and "stream" not in sent
    assert raw.headers["x-siren-rerank"] == "1/3"
    assert text == "a calm one"


def test_client_n_above_1_is_not_reranked(scripted):
    url, recorder = scripted
    with running_proxy(config(url), KeywordScorer()) as proxy:
        response = httpx.post(proxy.url + "/v1/chat/completions", headers={"x-script": "text:one|two"},
                              json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2})
    assert recorder.requests[-1]["body"]["n"] == 2
    assert [c["message"]["content"] for c in response.json()["choices"]] == ["one", "two"]
    assert "x-siren-rerank" not in response.headers


def test_upstream_error_passes_through(scripted):
    url, _ = scripted
    with running_proxy(config(url), KeywordScorer()) as proxy:
        response = httpx.post(proxy.url + "/v1/chat/completions", headers={"x-script": "nope:1"},
                              json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    assert json.loads(response.content)["error"]["message"].startswith("unknown script")


def test_a_streamed_candidate_keeps_its_logprobs(scripted):
    """The chosen candidate's log-probabilities, which the client asked for, go with its
    text in the stream (they were dropped: `logprobs: null` on every chunk)."""
    chunks = streamed(scripted[0], logprobs=True)
    tokens = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == ["a ", "calm ", "one "]


def test_a_streamed_candidate_keeps_its_function_call():
    """A candidate of the legacy functions API streams its `function_call` (it streamed an
    empty delta, then finish_reason "function_call" with no call)."""
    reply = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": None,
                                 "function_call": {"name": "f", "arguments": '{"a": 1}'}},
         "finish_reason": "function_call"}]}
    data = json.dumps(reply).encode()
    answer = [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(data), data]
    with RawUpstream(lambda head: answer) as upstream, running_proxy(config(upstream.url + "/v1"),
                                                                     KeywordScorer()) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk", max_retries=0)
        with client:
            chunks = list(client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                functions=[{"name": "f", "parameters": {"type": "object"}}]))
    calls = [c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call]
    assert [(call.name, call.arguments) for call in calls] == [("f", '{"a": 1}')]
    assert chunks[-1].choices[0].finish_reason == "function_call"


class NanScorer(KeywordScorer):
    """A guard that answers NaN (a model failure) for any text with "NAN" in it."""

    async def _score(self, text: str) -> float:
        return float("nan") if "NAN" in text else await super()._score(text)


@pytest.mark.parametrize("script", ["text:NAN|NAN|NAN", "text:calm|NAN|calm"])
@pytest.mark.parametrize("on_error,status", [("block", 503), ("allow", 200)])
def test_a_nan_candidate_score_is_a_guard_failure(scripted, script, on_error, status):
    """A NaN score is a failed guard, as everywhere else: 503 under `block` (all-NaN
    candidates were answered with the refusal, a NaN one silently passed over), and
    under `allow` the candidates are ranked blind, as when the guard raises."""
    url, _ = scripted
    text = config(url).replace('refusal: "no."', f'refusal: "no."\n    on_guard_error: {on_error}')
    with running_proxy(text, NanScorer()) as proxy:
        response = httpx.post(proxy.url + "/v1/chat/completions", headers={"x-script": script},
                              json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == status
    if status == 503:
        assert response.json()["error"]["code"] == "guard_unavailable"
    else:
        assert response.json()["choices"][0]["message"]["content"] == script[5:].split("|")[0]
