"""A reasoning model's thinking, as real vLLM streams it, is guarded like its answer.

vLLM's `--reasoning-parser olmo3` works on text (OLMo 3 writes `<think>`/`</think>` as
plain tokens, and may start thinking without `<think>`), so it runs over SmolLM2: a reply
with no `</think>` streams as reasoning only, chat `delta.reasoning` and a Responses
reasoning item. Before the proxy read reasoning, all of it went to the client unscored.
Marked `vllm`; a second vLLM server is started for this module
(`SIREN_E2E_VLLM_REASONING_URL` points at one already running instead).
"""

from __future__ import annotations

import json
import os

import pytest

from tests.support.proxy import running_proxy
from tests.support.scorers import embedded_scorer

from .test_vllm import (BENIGN, CUT_EXTRA, CUT_MAX_TOKENS, CUT_MESSAGES, CUT_THRESHOLD, REFUSAL, audit_records, config,
                        sdk)
from .vllm_server import SERVED_NAME, settled_metrics, vllm_server

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def scorer():
    yield from embedded_scorer()


@pytest.fixture(scope="module")
def reasoning_url(tmp_path_factory):
    if os.environ.get("SIREN_E2E_VLLM_REASONING_URL"):
        yield os.environ["SIREN_E2E_VLLM_REASONING_URL"].rstrip("/")
        return
    log = tmp_path_factory.mktemp("vllm-reasoning") / "vllm.log"
    with vllm_server(log, extra_args=("--reasoning-parser", "olmo3")) as url:
        yield url


def guarded(url: str, audit) -> str:
    response = f"{{action: cut, threshold: {CUT_THRESHOLD}, check_every: 16, holdback: 16}}"
    return config(url, prompt="{action: shadow}", response=response, server=f"  audit_log: {audit}")


def test_harmful_thinking_from_vllm_is_cut_and_vllm_stops(reasoning_url, scorer, tmp_path):
    audit = tmp_path / "audit.jsonl"
    options = dict(model=SERVED_NAME, messages=CUT_MESSAGES, temperature=0, seed=7, stream=True,
                   extra_body=CUT_EXTRA)
    with sdk(reasoning_url) as direct:
        head = list(direct.chat.completions.create(max_tokens=64, **options))
    thinking = "".join((c.choices[0].delta.model_extra or {}).get("reasoning") or "" for c in head if c.choices)
    assert thinking and not any(c.choices[0].delta.content for c in head if c.choices)  # vLLM sent reasoning only
    before = settled_metrics(reasoning_url)
    with running_proxy(guarded(reasoning_url, audit), scorer) as proxy, sdk(proxy.url + "/v1") as client:
        chunks = list(client.chat.completions.create(max_tokens=CUT_MAX_TOKENS, **options))
    after = settled_metrics(reasoning_url)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["content_filter"]
    released = "".join((c.choices[0].delta.model_extra or {}).get("reasoning") or "" for c in chunks if c.choices)
    assert thinking.startswith(released)  # what was released is vLLM's own thinking, nothing after
    assert chunks[-1].choices[0].delta.content == REFUSAL
    record = audit_records(audit, 1)[0]
    cut = [d for d in record["decisions"] if d["action"] == "cut"]
    assert cut and cut[0]["score"] >= CUT_THRESHOLD, record
    assert record["leaked_tokens"] == {"0": 0}
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert after["vllm:request_success_total"] == before["vllm:request_success_total"]  # aborted, not finished
    assert generated < CUT_MAX_TOKENS, generated
    print(f"\nreasoning cut: released {len(released)} characters of thinking, decisions {record['decisions']}, "
          f"vLLM generated {generated} tokens (max_tokens {CUT_MAX_TOKENS})")


def test_benign_thinking_from_vllm_reaches_the_client_whole_and_scored(reasoning_url, scorer, tmp_path):
    audit = tmp_path / "audit.jsonl"
    options = dict(model=SERVED_NAME, messages=[{"role": "user", "content": BENIGN}], temperature=0, seed=7,
                   max_tokens=48, stream=True)
    with sdk(reasoning_url) as direct:
        expected = "".join((c.choices[0].delta.model_extra or {}).get("reasoning") or ""
                           for c in direct.chat.completions.create(**options) if c.choices)
    with running_proxy(guarded(reasoning_url, audit), scorer) as proxy, sdk(proxy.url + "/v1") as client:
        chunks = list(client.chat.completions.create(**options))
    thinking = "".join((c.choices[0].delta.model_extra or {}).get("reasoning") or "" for c in chunks if c.choices)
    assert thinking == expected and expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    record = audit_records(audit, 1)[0]
    checks = record["trajectories"]["0"]
    assert [position for position, _ in checks] == [16, 32, 48], checks  # the thinking was read as it grew
    assert all(score < CUT_THRESHOLD for _, score in checks), checks


def test_harmful_reasoning_item_from_vllms_responses_api_is_cut(reasoning_url, scorer, tmp_path):
    audit = tmp_path / "audit.jsonl"
    options = dict(model=SERVED_NAME, input=CUT_MESSAGES[0]["content"], temperature=0, stream=True,
                   max_output_tokens=CUT_MAX_TOKENS, extra_body=CUT_EXTRA)
    with running_proxy(guarded(reasoning_url, audit), scorer) as proxy, sdk(proxy.url + "/v1") as client:
        with client.responses.stream(**{k: v for k, v in options.items() if k != "stream"}) as stream:
            events = list(stream)
    types = [e.type for e in events]
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["reasoning", "message"]  # vLLM's reasoning item, then the refusal's message
    assert types[-1] == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "content_filter"
    refusal = [e for e in events if e.type == "response.output_text.delta"]
    assert [e.delta for e in refusal] == [REFUSAL] and refusal[0].output_index == 1  # after the reasoning item
    # the final event lists the reasoning the client was sent, cut mid-way, before the refusal
    reasoning, message = events[-1].response.output
    sent = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert reasoning.type == "reasoning" and reasoning.status == "incomplete"
    assert "".join(part.text for part in reasoning.content) == sent
    assert message.content[0].text == REFUSAL
    record = audit_records(audit, 1)[0]
    assert record["leaked_tokens"] == {"0": 0}
    print(f"\nResponses reasoning cut: {types.count('response.reasoning_text.delta')} reasoning deltas released, "
          f"decisions {json.dumps(record['decisions'])}")
