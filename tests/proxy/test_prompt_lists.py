"""A completions request with several prompts (`prompt` a list), guarded prompt by prompt.

vLLM and OpenAI complete each prompt of the list on its own, n choices each (choice i
answers prompt i // n). The guard scores each prompt on its own, not the list joined into
one text, where a mean over the others would dilute a harmful one (measured on the
shipped head in tests/e2e: 0.998 alone, 0.06 after four benign prompts); each choice is
scored with the prompt it answers, and a stream's every choice is guarded.
"""

from __future__ import annotations

import httpx
import pytest

from tests.support.clients import close_sdk_clients, sdk  # noqa: F401 - close_sdk_clients is autouse
from tests.support.proxy import running_proxy
from tests.support.scorers import KeywordScorer

from .test_guarded import CUT, FIXTURES, REFUSAL, policy_yaml

REFUSE = "{action: refuse, threshold: 0.5}"


def texts(reply) -> list[tuple[int, str, str]]:
    return [(c.index, c.text, c.finish_reason) for c in reply.choices]


def test_each_prompt_is_scored_on_its_own_and_one_refuses_the_request(scripted):
    url, recorder = scripted
    before = len(recorder.requests)
    scorer = KeywordScorer()
    with running_proxy(policy_yaml(url, prompt=REFUSE), scorer) as proxy:
        client = sdk(proxy)
        refused = client.completions.create(model="m", prompt=["otters", "a BOMB", "haiku"], n=2)
        streamed = list(client.completions.create(model="m", prompt=["otters", "a BOMB"], stream=True))
    assert texts(refused) == [(i, REFUSAL, "content_filter") for i in range(6)]  # every choice asked for
    assert sorted((c.choices[0].index, c.choices[0].text) for c in streamed if c.choices) == [(0, REFUSAL), (1, REFUSAL)]
    assert len(recorder.requests) == before
    assert {"otters", "a BOMB", "haiku"} <= set(scorer.calls)  # each prompt alone, never joined
    assert not any("\n" in call for call in scorer.calls)


def test_a_suffix_is_read_with_each_prompt(scripted):
    """An insertion request's `suffix` is text the model conditions on, as it does on the
    prompt: a harmful one beside a benign prompt is refused (it used to pass unread)."""
    url, recorder = scripted
    before = len(recorder.requests)
    scorer = KeywordScorer()
    with running_proxy(policy_yaml(url, prompt=REFUSE), scorer) as proxy:
        reply = sdk(proxy).completions.create(model="m", prompt=["otters", "haiku"], suffix="and a BOMB")
    assert texts(reply) == [(0, REFUSAL, "content_filter"), (1, REFUSAL, "content_filter")]
    assert len(recorder.requests) == before
    assert {"otters\nand a BOMB", "haiku\nand a BOMB"} <= set(scorer.calls)


def test_each_choice_is_scored_with_the_prompt_it_answers(scripted):
    """Choice i answers prompt i // n: with n = 2 the borderline prompt's choices are 2 and
    3, and only they cross (prompt + reply), though all replies are alike."""
    url, _ = scripted
    scorer = KeywordScorer()
    response = "{action: cut, threshold: 0.3}"
    with running_proxy(policy_yaml(url, response=response), scorer) as proxy:
        reply = sdk(proxy, default_headers={"x-script": "text:plain words"}).completions.create(
            model="m", prompt=["otters", "a borderline ask", "haiku"], n=2)
    assert [c[2] for c in texts(reply)] == ["stop", "stop", "content_filter", "content_filter", "stop", "stop"]
    # each on a session opened with the prompt it answers (its prefill cached by the prompt stage)
    assert sorted(s.text for s in scorer.sessions if s.text.endswith("plain words")) == (
        ["a borderline ask\nplain words"] * 2 + ["haiku\nplain words"] * 2 + ["otters\nplain words"] * 2)
    assert all(s.closed for s in scorer.sessions)


def test_every_choice_of_a_stream_is_guarded(scripted):
    """A stream of two prompts has choices 0 and 1; the second's text is checked and cut
    like the first's (it used to go out unscored: only choices below n had sessions)."""
    url, _ = scripted
    scorer = KeywordScorer()
    with running_proxy(policy_yaml(url, response=CUT % (2, 2)), scorer) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:one two three four|one two BOMB three four"})
        chunks = list(client.completions.create(model="m", prompt=["otters", "haiku"], stream=True))
    by_choice: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            by_choice[choice.index] = by_choice.get(choice.index, "") + choice.text
    assert by_choice[0] == "one two three four "
    assert "BOMB" not in by_choice[1] and by_choice[1].endswith(REFUSAL)
    assert {s.prompt for s in scorer.sessions} == {"otters", "haiku"}


def test_text_for_a_choice_nobody_asked_for_fails_the_stream_closed(scripted):
    """One prompt, n = 1, but the upstream streams a second choice (a recorded vLLM n = 2
    stream): that choice's text would never be scored, so a fail-closed policy ends the
    stream; asked with n = 2, the same bytes pass unchanged."""
    url, _ = scripted
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with running_proxy(policy_yaml(url, response=CUT % (16, 16)), KeywordScorer()) as proxy:
        forged = httpx.post(proxy.url + "/v1/chat/completions", json=body, headers={"x-script": "replay:stream_n2_raw.txt"})
        asked = httpx.post(proxy.url + "/v1/chat/completions", json={**body, "n": 2},
                           headers={"x-script": "replay:stream_n2_raw.txt"})
    assert '"code":"guard_unavailable"' in forged.text and forged.text.endswith("data: [DONE]\n\n")
    assert asked.content == (FIXTURES / "stream_n2_raw.txt").read_bytes()


def test_steer_puts_the_safety_message_before_each_prompt(scripted):
    url, recorder = scripted
    prompt = '{action: steer, threshold: 0.8, steer: {from: 0.3, system_message: "Be careful."}}'
    with running_proxy(policy_yaml(url, prompt=prompt), KeywordScorer()) as proxy:
        sdk(proxy).completions.create(model="m", prompt=["otters", "a borderline ask"])
    assert recorder.requests[-1]["body"]["prompt"] == ["Be careful.\n\notters", "Be careful.\n\na borderline ask"]


@pytest.mark.parametrize(("prompt", "n", "status"), [
    (["a"] * 65, 2, 400),  # 130 choices: over the 128 a guarded request may have
    (["a"] * 64, 2, 200),
    ([[1, 2], [3, 4]], 1, 503),  # token ids: not scoreable, and the policy fails closed
])
def test_bounds_and_token_ids(scripted, prompt, n, status):
    url, _ = scripted
    with running_proxy(policy_yaml(url, prompt=REFUSE), KeywordScorer()) as proxy:
        reply = httpx.post(proxy.url + "/v1/completions", json={"model": "m", "prompt": prompt, "n": n})
    assert reply.status_code == status, reply.text
    if status == 400:
        error = reply.json()["error"]
        assert error["param"] == "prompt" and "65 prompts x n = 2" in error["message"]
    elif status == 503:
        assert reply.json()["error"]["code"] == "guard_unavailable"
    else:
        assert len(reply.json()["choices"]) == 128


@pytest.mark.parametrize(("body", "choices"), [
    ({"prompt_embeds": "AAAA"}, 1),
    ({"prompt_embeds": ["AAAA", "BBBB"], "prompt": "hi"}, 3),
    ({"prompt_embeds": "AAAA", "prompt": ["hi", "otters"]}, 3),
])
def test_prompt_embeds_are_prompts_the_guard_cannot_read(scripted, body, choices):
    """vLLM completes `prompt_embeds` (embeddings, base64) as prompts of their own, before
    `prompt`'s: nothing the guard reads, so a fail-closed policy refuses the request
    (503) without calling the upstream, and `on_guard_error: allow` lets it through."""
    url, recorder = scripted
    before = len(recorder.requests)
    body = {"model": "m", **body}
    with running_proxy(policy_yaml(url, prompt=REFUSE), KeywordScorer()) as proxy:
        closed = httpx.post(proxy.url + "/v1/completions", json=body)
    reached = len(recorder.requests) - before
    allow = policy_yaml(url, prompt=REFUSE, response=CUT % (2, 2), policy_extra="    on_guard_error: allow")
    with running_proxy(allow, KeywordScorer()) as proxy:
        allowed = httpx.post(proxy.url + "/v1/completions", json=body, headers={"x-script": "text:fine"})
    assert closed.status_code == 503 and closed.json()["error"]["code"] == "guard_unavailable"
    assert reached == 0
    assert allowed.status_code == 200, allowed.text
    assert recorder.requests[-1]["body"] == body and len(allowed.json()["choices"]) == choices


EMBEDS = {"type": "prompt_embeds", "data": "AAAA"}


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, EMBEDS]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"prompt_embeds": "", "data": "AAAA"}]}]}),
    ("/v1/responses", {"input": [{"role": "user", "content": [EMBEDS]}]}),
    ("/v1/chat/completions/batch", {"messages": [[{"role": "user", "content": "hi"}],
                                                 [{"role": "user", "content": [EMBEDS]}]]}),
])
def test_prompt_embeds_in_a_message_are_a_prompt_the_guard_cannot_read(scripted, path, body):
    """vLLM (with --enable-prompt-embeds) splices a `prompt_embeds` content part into a chat
    message where its text would be: embeddings of any text, which the guard cannot read,
    so the prompt is not scoreable (as `prompt_embeds` on completions): a fail-closed
    policy refuses it (503) without calling the upstream. Before, the part was skipped as
    an image is and the message scored on its text alone."""
    url, recorder = scripted
    before = len(recorder.requests)
    with running_proxy(policy_yaml(url, prompt=REFUSE), KeywordScorer()) as proxy:
        closed = httpx.post(proxy.url + path, json={"model": "m", **body})
    assert closed.status_code == 503 and closed.json()["error"]["code"] == "guard_unavailable", closed.text
    assert len(recorder.requests) == before
