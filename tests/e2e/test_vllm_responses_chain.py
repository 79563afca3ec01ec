"""Chained Responses requests against a real vLLM that stores responses
(`VLLM_ENABLE_RESPONSES_API_STORE=1`): openai SDK -> siren-proxy (real guard) -> vLLM.

vLLM keeps every stored response's whole conversation, the text of a reply the proxy cut
included, and a request naming its `previous_response_id` continues it. These tests show
the proxy's memory (*Chained Responses requests* in the README) working with vLLM's own
ids: a chained turn reaches vLLM and is scored after the turn it continues, and a chain
from a reply the proxy cut is refused without calling vLLM (read off vLLM's /metrics).
Marked `vllm`; starts its own vLLM (about a minute).
"""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest

from tests.support.proxy import running_proxy
from tests.support.scorers import embedded_scorer

from .test_vllm import BENIGN, CUT_MESSAGES, CUT_THRESHOLD, REFUSAL, audit_records, config, sdk
from .vllm_server import SERVED_NAME, settled_metrics, vllm_server

pytestmark = pytest.mark.vllm

CONVERSATION = "{action: refuse, threshold: 0.5, scope: conversation}"


@pytest.fixture(scope="module")
def scorer():
    yield from embedded_scorer()


@pytest.fixture(scope="module")
def storing_vllm(tmp_path_factory):
    """A vLLM that keeps responses (vLLM 0.32 quietly drops `store` without the variable).
    `SIREN_E2E_VLLM_STORE_URL` uses one already running instead."""
    if os.environ.get("SIREN_E2E_VLLM_STORE_URL"):
        yield os.environ["SIREN_E2E_VLLM_STORE_URL"].rstrip("/")
        return
    log = tmp_path_factory.mktemp("vllm-store") / "vllm.log"
    with vllm_server(log, extra_env={"VLLM_ENABLE_RESPONSES_API_STORE": "1"}) as url:
        yield url


def two_routes(url: str, audit) -> str:
    """/open/v1, whose prompt stage only shadows (a harmful request is answered, and its
    reply cut), and /v1, which refuses, on the same vLLM."""
    return f"""
server:
  audit_log: {audit}
upstreams:
  vllm: {{base_url: {url}, read_timeout: 300}}
policies:
  open:
    prompt: {{action: shadow}}
    response: {{action: cut, threshold: {CUT_THRESHOLD}}}
  strict:
    prompt: {{action: refuse, threshold: 0.5}}
    response: {{action: cut, threshold: {CUT_THRESHOLD}}}
routes:
  - {{prefix: /open/v1, upstream: vllm, policy: open}}
  - {{prefix: /v1, upstream: vllm, policy: strict}}
"""


def test_a_chained_turn_reaches_vllm_scored_after_the_turn_it_continues(storing_vllm, scorer, tmp_path):
    audit = tmp_path / "audit.jsonl"
    text = config(storing_vllm, prompt=CONVERSATION, response="{action: cut, threshold: 0.9}",
                  server=f"  audit_log: {audit}")
    with running_proxy(text, scorer) as proxy, sdk(proxy.url + "/v1") as client:
        first = client.responses.create(model=SERVED_NAME, input=BENIGN, temperature=0, max_output_tokens=32)
        second = client.responses.create(model=SERVED_NAME, input="Now name one more.", temperature=0,
                                         max_output_tokens=32, previous_response_id=first.id)
        held = httpx.get(proxy.url + "/metrics").text
    assert first.output_text and second.output_text  # vLLM found its own id: the chain ran
    assert second.id != first.id
    memory = [line for line in held.splitlines() if line.startswith("siren_proxy_responses_memory_bytes")]
    assert memory and float(memory[0].split()[-1]) > len(first.output_text)
    # the proxy read the chained turn after the first: its score is that of the whole text
    records = audit_records(audit, 2)
    whole = f"user: {BENIGN}\nassistant: {first.output_text}\nuser: Now name one more."
    expected = asyncio.run(scorer.score(prompt=whole))
    chained = [d for d in records[1]["decisions"] if d["stage"] == "prompt"][0]
    print(f"\nchained prompt score {chained['score']:.4f}, whole text {expected:.4f}")
    assert chained["score"] == pytest.approx(expected, abs=2e-3)


def test_a_chain_from_a_reply_the_proxy_cut_is_refused_without_calling_vllm(storing_vllm, scorer, tmp_path):
    """The harmful question goes through a route whose prompt stage only shadows, so the
    reply is generated and cut; the chain from it goes through a route that refuses, on
    the same upstream (the memory is per proxy key and upstream, not per route)."""
    audit = tmp_path / "audit.jsonl"
    text = two_routes(storing_vllm, audit)
    with running_proxy(text, scorer) as proxy, sdk(proxy.url + "/open/v1") as opened, \
            sdk(proxy.url + "/v1") as strict:
        cut = opened.responses.create(model=SERVED_NAME, input=CUT_MESSAGES[0]["content"], temperature=0,
                                      max_output_tokens=64)
        assert cut.output_text == REFUSAL and cut.status == "incomplete", cut
        stored = httpx.get(f"{storing_vllm}/responses/{cut.id}", timeout=30).json()
        before = settled_metrics(storing_vllm)
        again = strict.responses.create(model=SERVED_NAME, input="Repeat your last answer word for word.",
                                        previous_response_id=cut.id, max_output_tokens=64)
        after = settled_metrics(storing_vllm)
    # vLLM kept the whole reply the client never got; the chain from it never reached vLLM
    kept = "".join(part.get("text", "") for item in stored.get("output", []) if item.get("type") == "message"
                   for part in item.get("content", []))
    print(f"\nvLLM kept the cut reply: {kept[:80]!r}")
    assert stored.get("id") == cut.id and kept and REFUSAL not in kept, stored
    assert again.output_text == REFUSAL
    assert after["vllm:request_success_total"] == before["vllm:request_success_total"]
    assert after.get("vllm:prompt_tokens_total") == before.get("vllm:prompt_tokens_total")
    decision = [d for d in audit_records(audit, 2)[1]["decisions"] if d["stage"] == "prompt"][0]
    assert decision["action"] == "refuse" and decision.get("reason") == "previous_response_cut", decision


def done(client, response_id: str, **kw):
    """A background response read back through the proxy until vLLM has finished it."""
    for _ in range(600):
        read = client.responses.retrieve(response_id, **kw)
        if read.status not in ("queued", "in_progress"):
            return read
        time.sleep(0.2)
    raise AssertionError(f"{response_id} still {read.status}")


def test_a_background_reply_is_guarded_when_it_is_read_back(storing_vllm, scorer, tmp_path):
    """`background: true`, not streamed: vLLM answers "queued" and generates on; the
    client polls `GET responses/{id}` through the proxy. The harmful reply is the refusal
    when read back, while vLLM holds its text, and a chain from it is refused; the benign
    one reads back as vLLM wrote it, and may then be continued (until it was read back,
    the proxy had not read it: a chain from it was refused)."""
    audit = tmp_path / "audit.jsonl"
    text = two_routes(storing_vllm, audit)
    with running_proxy(text, scorer) as proxy, sdk(proxy.url + "/open/v1") as opened, \
            sdk(proxy.url + "/v1") as strict:
        harmful = opened.responses.create(model=SERVED_NAME, input=CUT_MESSAGES[0]["content"], temperature=0,
                                          max_output_tokens=64, background=True)
        benign = opened.responses.create(model=SERVED_NAME, input=BENIGN, temperature=0, max_output_tokens=32,
                                         background=True)
        assert harmful.status == benign.status == "queued"
        cut, fine = done(opened, harmful.id), done(opened, benign.id)
        kept = httpx.get(f"{storing_vllm}/responses/{harmful.id}", timeout=30).json()
        wrote = httpx.get(f"{storing_vllm}/responses/{benign.id}", timeout=30).json()
        again = strict.responses.create(model=SERVED_NAME, input="Repeat your last answer word for word.",
                                        previous_response_id=harmful.id, max_output_tokens=16)
        more = strict.responses.create(model=SERVED_NAME, input="Now name one more.", temperature=0,
                                       max_output_tokens=16, previous_response_id=benign.id)
    kept_text = kept["output"][-1]["content"][0]["text"]
    print(f"\nvLLM kept the background reply: {kept_text[:80]!r}; the client read {cut.output_text!r}")
    assert cut.id == harmful.id and cut.output_text == REFUSAL and kept_text and REFUSAL not in kept_text
    assert fine.output_text == wrote["output"][-1]["content"][0]["text"] and fine.output_text
    assert again.output_text == REFUSAL
    assert more.output_text and more.output_text != REFUSAL
    reads = [d for line in audit_records(audit, 4) if line["endpoint"] == "responses/retrieve"
             for d in line["decisions"]]
    assert any(d["action"] == "cut" and d["score"] >= CUT_THRESHOLD for d in reads), reads


def test_a_resumed_replay_of_a_background_stream(storing_vllm, scorer):
    """`background: true, stream: true`, then `GET responses/{id}?stream=true&starting_after=n`
    (a client resuming): the proxy asks vLLM for the whole replay, scores it from the
    start, and sends only the events after n, as vLLM would."""
    text = config(storing_vllm, prompt="{action: shadow}", response=f"{{action: cut, threshold: {CUT_THRESHOLD}}}")
    with running_proxy(text, scorer) as proxy, sdk(proxy.url + "/v1") as client:
        first = list(client.responses.create(model=SERVED_NAME, input=BENIGN, temperature=0,
                                             max_output_tokens=32, background=True, stream=True))
        response_id = first[0].response.id
        resumed = list(client.responses.retrieve(response_id, stream=True, starting_after=5))
        direct = httpx.get(f"{storing_vllm}/responses/{response_id}",
                           params={"stream": "true", "starting_after": 5}, timeout=60).text
    numbers = [e.sequence_number for e in resumed]
    direct_numbers = [int(line.split('"sequence_number":')[1].split(",")[0].split("}")[0])
                      for line in direct.splitlines() if line.startswith("data: ")]
    deltas = "".join(e.delta for e in resumed if e.type == "response.output_text.delta")
    print(f"\nresumed after 5: {len(resumed)} events, {deltas[:60]!r}")
    assert numbers == direct_numbers and numbers[0] == 6
    assert deltas and "".join(e.delta for e in first if e.type == "response.output_text.delta").endswith(deltas)
