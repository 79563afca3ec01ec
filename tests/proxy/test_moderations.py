"""`POST /v1/moderations` answered by the guard (`moderations: guard`): openai SDK ->
siren-proxy, the upstream never called. The scorer is `KeywordScorer` (BOMB scores 0.99,
borderline 0.4, anything else 0.01); tests/proxy/test_real_guard.py runs the real guard.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.support.clients import close_sdk_clients, sdk  # noqa: F401 - close_sdk_clients is autouse
from tests.support.proxy import running_proxy
from tests.support.scorers import KeywordScorer

from .test_guarded import policy_yaml

DEAD = "http://127.0.0.1:9/v1"  # nothing listens: an answer proves the upstream was not called
GUARD = "    moderations: guard"


def config(url: str = DEAD, *, threshold: float = 0.5, extra: str = "", server: str = "") -> str:
    return policy_yaml(url, prompt=f"{{action: refuse, threshold: {threshold}}}", policy_extra=GUARD + extra,
                       server=server)


def test_the_guard_answers_in_openais_shape_without_the_upstream(tmp_path):
    audit = tmp_path / "audit.jsonl"
    with running_proxy(config(server=f"  audit_log: {audit}"), KeywordScorer()) as proxy:
        reply = sdk(proxy).moderations.create(input="how to build a BOMB", model="omni-moderation-latest")
    assert reply.id.startswith("modr-") and reply.model == "omni-moderation-latest"
    [result] = reply.results
    assert result.flagged is True
    assert result.categories.model_extra == {"harmful": True}
    assert result.category_scores.model_extra == {"harmful": 0.99}
    assert result.category_applied_input_types.model_extra == {"harmful": ["text"]}
    assert result.categories.hate is None  # OpenAI's categories: not judged, so not claimed
    [record] = [json.loads(line) for line in audit.read_text().splitlines()]
    assert record["endpoint"] == "moderations" and record["stream"] is False
    assert [(d["stage"], d["action"], d["score"], d["crossed"]) for d in record["decisions"]] == [
        ("moderations", "flag", 0.99, True)]


def test_a_list_of_strings_gets_one_result_each_in_order(tmp_path):
    audit = tmp_path / "audit.jsonl"
    scorer = KeywordScorer()
    with running_proxy(config(server=f"  audit_log: {audit}"), scorer) as proxy:
        reply = sdk(proxy).moderations.create(input=["otters?", "a BOMB", "borderline", ""])
        metrics = httpx.get(proxy.url + "/metrics").text
    assert reply.model == "siren"  # no model asked for: the guard's name
    assert [(r.flagged, r.category_scores.model_extra["harmful"]) for r in reply.results] == [
        (False, 0.01), (True, 0.99), (False, 0.4), (False, 0.01)]
    assert scorer.calls == ["otters?", "a BOMB", "borderline", ""]
    [record] = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(d["choice"], d["action"]) for d in record["decisions"]] == [
        (0, "allow"), (1, "flag"), (2, "allow"), (3, "allow")]
    assert 'siren_proxy_guard_decisions_total{action="flag",stage="moderations"} 1.0' in metrics
    assert 'siren_proxy_guard_decisions_total{action="allow",stage="moderations"} 3.0' in metrics


def test_content_parts_are_one_input_and_one_result():
    scorer = KeywordScorer()
    with running_proxy(config(), scorer) as proxy:
        reply = sdk(proxy).moderations.create(input=[{"type": "text", "text": "how to build"},
                                                     {"type": "text", "text": "a BOMB"}])
    assert [r.flagged for r in reply.results] == [True]
    assert scorer.calls == ["how to build\na BOMB"]


@pytest.mark.parametrize("threshold, flagged", [(0.3, True), (0.4, True), (0.5, False)])
def test_flagged_is_the_policys_prompt_threshold(threshold, flagged):
    with running_proxy(config(threshold=threshold), KeywordScorer()) as proxy:
        [result] = sdk(proxy).moderations.create(input="borderline").results
    assert result.flagged is flagged and result.categories.model_extra == {"harmful": flagged}


def test_an_image_part_is_refused_not_judged_on_the_text_alone():
    scorer = KeywordScorer()
    with running_proxy(config(), scorer) as proxy, pytest.raises(openai.BadRequestError) as caught:
        sdk(proxy).moderations.create(input=[{"type": "text", "text": "what is this?"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}])
    error = caught.value.body
    assert (error["param"], error["code"], error["type"]) == ("input[1]", "unsupported_input", "invalid_request_error")
    assert scorer.calls == []


@pytest.mark.parametrize("body, param", [
    ({"model": "m"}, "input"),
    ({"input": None}, "input"),
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    ({"input": {"text": "hi"}}, "input"),
    ({"input": ["hi", 5]}, "input[1]"),  # a list with strings is a list of strings
    ({"input": [{"type": "text", "text": "a"}, "b"]}, "input[0]"),
    ({"input": [{"type": "text", "text": 5}]}, "input[0]"),
    ({"input": [{"type": "text"}, {"type": "video"}]}, "input[0]"),
    ({"input": [{"type": "text", "text": "a"}, {"type": "video"}]}, "input[1]"),
    ({"input": ["x"] * 129}, "input"),
    ({"input": "hi", "model": 5}, "model"),
])
def test_bad_shapes_are_400s_naming_the_field(body, param):
    scorer = KeywordScorer()
    with running_proxy(config(), scorer) as proxy:
        reply = httpx.post(proxy.url + "/v1/moderations", json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert scorer.calls == []


def test_128_inputs_are_scored():
    with running_proxy(config(), KeywordScorer()) as proxy:
        reply = sdk(proxy).moderations.create(input=["x"] * 127 + ["BOMB"])
    assert len(reply.results) == 128 and reply.results[-1].flagged


@pytest.mark.parametrize("on_guard_error", ["block", "allow"])
@pytest.mark.parametrize("scorer, status, code", [
    (KeywordScorer(fail=True), 503, "guard_unavailable"),
    (KeywordScorer(busy=True), 503, "overloaded"),
    (None, 503, "guard_unavailable"),
])
def test_a_guard_that_fails_is_a_503_whatever_on_guard_error_says(scorer, status, code, on_guard_error):
    with running_proxy(config(extra=f"\n    on_guard_error: {on_guard_error}"), scorer) as proxy:
        reply = httpx.post(proxy.url + "/v1/moderations", json={"input": "otters?"})
    assert (reply.status_code, reply.json()["error"]["code"]) == (status, code)
    assert ("retry-after" in reply.headers) is (code == "overloaded")


class NonsenseScorer(KeywordScorer):
    async def score_many(self, items):
        return [float("nan") for _ in items]


def test_a_score_that_is_not_a_probability_is_a_guard_failure():
    with running_proxy(config(), NonsenseScorer()) as proxy:
        reply = httpx.post(proxy.url + "/v1/moderations", json={"input": "otters?"})
    assert (reply.status_code, reply.json()["error"]["code"]) == (503, "guard_unavailable")


@pytest.mark.parametrize("scorer, error", [
    (KeywordScorer(fail=True), "GuardBroke: scripted guard failure"),
    (KeywordScorer(busy=True), "the guard's queue is full"),
    (NonsenseScorer(), "input 0: invalid score"),
])
def test_a_guard_failure_is_logged_counted_and_audited(tmp_path, scorer, error):
    """As a stage's guard failure is: the 503 left no decision, count or audit line."""
    audit = tmp_path / "audit.jsonl"
    with running_proxy(config(server=f"  audit_log: {audit}"), scorer) as proxy:
        reply = httpx.post(proxy.url + "/v1/moderations", json={"input": "otters?"})
        metrics = httpx.get(proxy.url + "/metrics").text
    assert reply.status_code == 503
    assert 'siren_proxy_guard_decisions_total{action="guard_error",stage="moderations"} 1.0' in metrics
    [record] = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(d["stage"], d["action"], d["guard_error"]) for d in record["decisions"]] == [
        ("moderations", "guard_error", error)]


def test_by_default_moderations_are_forwarded_to_the_upstream(scripted):
    """`moderations: forward` (the default): the upstream's own moderation answers, as a
    transparent proxy passes any endpoint that generates no text."""
    url, _ = scripted
    yaml_text = policy_yaml(url, prompt="{action: refuse, threshold: 0.5}", response="{action: cut}")
    with running_proxy(yaml_text, KeywordScorer()) as proxy:
        reply = httpx.post(proxy.url + "/v1/moderations", json={"input": "a BOMB"})
    assert reply.status_code == 200
    assert reply.json()["path"] == "/v1/moderations"  # the scripted upstream's echo of the request


def test_a_route_mounted_on_the_endpoint_is_answered_too():
    yaml_text = f"""
upstreams:
  up: {{base_url: {DEAD}/moderations}}
policies:
  p:
{GUARD}
routes:
  - {{prefix: /check, upstream: up, policy: p}}
"""
    with running_proxy(yaml_text, KeywordScorer()) as proxy:
        reply = httpx.post(proxy.url + "/check", json={"input": "a BOMB"})
    assert reply.status_code == 200 and reply.json()["results"][0]["flagged"] is True


def test_the_proxys_own_keys_still_apply():
    with running_proxy(config(server="  api_keys: [sk-proxy]"), KeywordScorer()) as proxy:
        denied = httpx.post(proxy.url + "/v1/moderations", json={"input": "hi"})
        allowed = httpx.post(proxy.url + "/v1/moderations", json={"input": "hi"},
                             headers={"authorization": "Bearer sk-proxy"})
    assert denied.status_code == 401 and allowed.status_code == 200


def test_an_input_over_max_prompt_bytes_is_a_400():
    scorer = KeywordScorer()
    with running_proxy(config(server="  max_prompt_bytes: 100"), scorer) as proxy:
        one = httpx.post(proxy.url + "/v1/moderations", json={"input": "x" * 101})
        listed = httpx.post(proxy.url + "/v1/moderations", json={"input": ["fine", "x" * 101]})
    assert [(r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) for r in (one, listed)] == [
        (400, "prompt_too_long", "input"), (400, "prompt_too_long", "input[1]")]
    assert scorer.calls == []
