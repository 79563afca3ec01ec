"""proxy.sse: recorded streams at every split, a table of spec edge cases, the encoders."""

from __future__ import annotations

import bisect
import itertools
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import (
    DONE,
    Event,
    EventJSONError,
    EventTooLarge,
    Item,
    Passthrough,
    SSEDecoder,
    SSEError,
    encode_event,
    encode_json,
)

FIXTURES = Path(__file__).parent / "fixtures"
STREAMS = sorted(FIXTURES.glob("*/*_raw.txt"))
BOM = b"\xef\xbb\xbf"


def decode(data: bytes, cuts: Sequence[int] = (), **kwargs: int) -> list[Item]:
    decoder = SSEDecoder(**kwargs)
    items: list[Item] = []
    for start, end in itertools.pairwise([0, *cuts, len(data)]):
        items += decoder.feed(data[start:end])
    return items + decoder.close()


def events(data: bytes) -> list[Event]:
    return [item for item in decode(data) if isinstance(item, Event)]


def fixture(name: str) -> bytes:
    (path,) = FIXTURES.glob(f"*/{name}")
    return path.read_bytes()


def assert_split_invariant(data: bytes) -> list[Item]:
    """Every two-way split gives the same items as no split, each as early as it can."""
    whole = decode(data)
    assert b"".join(item.raw for item in whole) == data
    ends = list(itertools.accumulate(len(item.raw) for item in whole))
    for cut in range(len(data) + 1):
        decoder = SSEDecoder()
        first = decoder.feed(data[:cut])
        assert first + decoder.feed(data[cut:]) + decoder.close() == whole, cut
        # Prompt: the first feed returns every block it completes, except one whose
        # blank line ends in a bare CR right at the cut (it might be half a CRLF).
        ready = bisect.bisect_right(ends, cut)
        if ready and isinstance(whole[ready - 1], Passthrough) and whole[ready - 1].truncated:
            ready -= 1
        if ready and ends[ready - 1] == cut and data[cut - 1:cut] == b"\r":
            ready -= 1
        assert len(first) == ready, cut
    return whole


# --- recorded and recorded-shape streams -------------------------------------------

def test_fixtures_present():
    names = {path.name for path in STREAMS}
    assert {"stream_raw.txt", "stream_no_usage_raw.txt", "stream_n2_raw.txt", "completions_stream_raw.txt",
            "chat_tool_calls_raw.txt", "chat_inband_error_raw.txt", "responses_raw.txt",
            "keepalive_raw.txt", "crlf_usage_raw.txt"} <= names


@pytest.mark.parametrize("path", STREAMS, ids=lambda path: path.name)
def test_stream_every_split(path: Path):
    whole = assert_split_invariant(path.read_bytes())
    assert not any(isinstance(item, Passthrough) and item.truncated for item in whole)
    for item in whole:
        if isinstance(item, Event) and not item.is_done:
            assert isinstance(item.json(), dict)


@pytest.mark.parametrize("path", STREAMS, ids=lambda path: path.name)
def test_stream_random_multiway_splits(path: Path):
    data = path.read_bytes()
    whole = decode(data)
    rng = random.Random(path.name)
    for _ in range(40):
        cuts = sorted(rng.sample(range(len(data) + 1), rng.randint(2, 30)))
        items = decode(data, cuts)
        assert items == whole
        assert b"".join(item.raw for item in items) == data
    assert decode(data, list(range(len(data)))) == whole  # one byte at a time


def chat_content(stream: list[Event], index: int = 0) -> str:
    return "".join(choice["delta"].get("content") or ""
                   for event in stream if not event.is_done
                   for choice in event.json()["choices"] if choice["index"] == index)


def test_vllm_stream_with_usage():
    stream = events(fixture("stream_raw.txt"))
    assert stream[0].json()["choices"][0]["delta"]["role"] == "assistant"
    assert chat_content(stream) == "The capital of France is Paris."
    assert stream[-3].json()["choices"][0]["finish_reason"] == "stop"
    usage = stream[-2].json()
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 42, "total_tokens": 50, "completion_tokens": 8}
    assert stream[-1].is_done and stream[-1].raw == DONE
    assert all(event.event is None and event.id is None for event in stream)


def test_vllm_stream_without_usage():
    stream = events(fixture("stream_no_usage_raw.txt"))
    assert stream[-1].is_done
    assert not any("usage" in event.json() for event in stream[:-1])
    assert stream[-2].json()["choices"][0]["finish_reason"] == "length"
    assert chat_content(stream) == "I'm glad to meet"


def test_vllm_n2_stream_interleaves_choices_then_usage_then_done():
    stream = events(fixture("stream_n2_raw.txt"))
    assert stream[-1].is_done
    usage = stream[-2].json()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 24
    indices = [choice["index"] for event in stream[:-2] for choice in event.json()["choices"]]
    assert set(indices) == {0, 1}
    assert {(a, b) for a, b in itertools.pairwise(indices) if a != b} == {(0, 1), (1, 0)}
    assert chat_content(stream, 0).startswith("there you")
    assert chat_content(stream, 1).startswith("I")
    finishes = [(choice["index"], choice["finish_reason"]) for event in stream[:-2]
                for choice in event.json()["choices"] if choice["finish_reason"]]
    assert sorted(finishes) == [(0, "length"), (1, "length")]


def test_vllm_completions_stream():
    stream = events(fixture("completions_stream_raw.txt"))
    assert "".join(c["text"] for e in stream[:-2] for c in e.json()["choices"]) == " a canvas of"
    assert stream[-2].json()["usage"]["completion_tokens"] == 3
    assert stream[-1].is_done


def test_tool_call_argument_fragments_join_to_json():
    stream = events(fixture("chat_tool_calls_raw.txt"))
    calls = [call for event in stream[:-1] for choice in event.json()["choices"]
             for call in choice["delta"].get("tool_calls", [])]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert all(call["index"] == 0 and "id" not in call for call in calls[1:])
    arguments = "".join(call["function"]["arguments"] for call in calls)
    assert json.loads(arguments) == {"location": "Zürich, Schweiz", "unit": "celsius"}
    assert stream[-3].json()["choices"][0]["finish_reason"] == "tool_calls"
    assert all(event.json()["usage"] is None for event in stream[:-3])
    assert stream[-2].json()["usage"]["total_tokens"] == 100 and stream[-1].is_done


def test_inband_error_then_done():
    stream = events(fixture("chat_inband_error_raw.txt"))
    error = stream[-2].json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert stream[-1].is_done
    assert chat_content(stream[:-2]) == "Sure, here"


def test_responses_stream_event_names_and_deltas():
    stream = events(fixture("responses_raw.txt"))
    assert all(event.event == event.json()["type"] for event in stream)
    assert [e.json()["sequence_number"] for e in stream] == list(range(len(stream)))
    assert stream[0].event == "response.created" and stream[-1].event == "response.completed"
    deltas = "".join(e.json()["delta"] for e in stream if e.event == "response.output_text.delta")
    (done,) = [e.json()["text"] for e in stream if e.event == "response.output_text.done"]
    assert deltas == done == "Bonjour — ça va ? 👋"
    assert not any(event.is_done for event in stream)


def test_keepalive_comments_are_passthrough_items():
    items = decode(fixture("keepalive_raw.txt"))
    kinds = ["E" if isinstance(item, Event) else item.comment for item in items]
    assert kinds == ["ping", "E", "ping", "ping", "E", "OPENROUTER PROCESSING", "E", "E", "E"]
    inside = items[6]
    assert inside.data.endswith('}') and inside.raw.endswith(b"\n: mid-event comment\n\n")
    assert chat_content([item for item in items if isinstance(item, Event)]) == "Hello"


def test_crlf_stream_decodes_like_its_lf_twin():
    data = fixture("crlf_usage_raw.txt")
    assert data.count(b"\r\n") == data.count(b"\n")
    crlf, lf = decode(data), decode(data.replace(b"\r\n", b"\n"))
    assert [(type(i), getattr(i, "data", None), getattr(i, "comment", None)) for i in crlf] == \
        [(type(i), getattr(i, "data", None), getattr(i, "comment", None)) for i in lf]
    assert all(item.raw.endswith(b"\r\n\r\n") for item in crlf)
    stream = [item for item in crlf if isinstance(item, Event)]
    assert chat_content(stream) == "Grüß Gott!"
    assert stream[-2].json()["usage"]["total_tokens"] == 13 and stream[-1].is_done


# --- spec edge cases -----------------------------------------------------------------

EDGE_CASES = [
    ("lf", b"data: a\n\n", [Event(data="a", raw=b"data: a\n\n")]),
    ("crlf", b"data: a\r\n\r\n", [Event(data="a", raw=b"data: a\r\n\r\n")]),
    ("cr only", b"data: a\r\rdata: b\r\r",
     [Event(data="a", raw=b"data: a\r\r"), Event(data="b", raw=b"data: b\r\r")]),
    ("mixed endings", b"data: a\r\ndata: b\rdata: c\n\r\n",
     [Event(data="a\nb\nc", raw=b"data: a\r\ndata: b\rdata: c\n\r\n")]),
    ("lf then cr is two lines", b"data: a\n\rdata: b\n\n",
     [Event(data="a", raw=b"data: a\n\r"), Event(data="b", raw=b"data: b\n\n")]),
    ("no space after colon", b"data:a\n\n", [Event(data="a", raw=b"data:a\n\n")]),
    ("only one space is dropped", b"data:  a \n\n", [Event(data=" a ", raw=b"data:  a \n\n")]),
    ("colon in value", b"data: {\"a\": 1}\n\n", [Event(data='{"a": 1}', raw=b"data: {\"a\": 1}\n\n")]),
    ("field without colon", b"data\ndata\n\n", [Event(data="\n", raw=b"data\ndata\n\n")]),
    ("empty data dispatches", b"data:\n\n", [Event(data="", raw=b"data:\n\n")]),
    ("multiple data lines", b"data: a\ndata:\ndata: b\n\n",
     [Event(data="a\n\nb", raw=b"data: a\ndata:\ndata: b\n\n")]),
    ("event id retry", b"event: add\nid: 7\nretry: 3000\ndata: x\n\n",
     [Event(data="x", event="add", id="7", retry=3000, raw=b"event: add\nid: 7\nretry: 3000\ndata: x\n\n")]),
    ("id persists, retry does not", b"id: 7\nretry: 5\ndata: a\n\ndata: b\n\nid\ndata: c\n\n",
     [Event(data="a", id="7", retry=5, raw=b"id: 7\nretry: 5\ndata: a\n\n"),
      Event(data="b", id="7", raw=b"data: b\n\n"), Event(data="c", id="", raw=b"id\ndata: c\n\n")]),
    ("id with NUL ignored", b"id: a\x00b\ndata: x\n\n", [Event(data="x", raw=b"id: a\x00b\ndata: x\n\n")]),
    ("bad retry ignored", b"retry: 3s\nretry: \xd9\xa3\nretry:\nretry:  5\ndata: x\n\n",
     [Event(data="x", raw=b"retry: 3s\nretry: \xd9\xa3\nretry:\nretry:  5\ndata: x\n\n")]),
    ("empty event is the default type", b"event:\ndata: x\n\n",
     [Event(data="x", raw=b"event:\ndata: x\n\n")]),
    ("last event field wins", b"event: a\nevent: b\ndata: x\n\n",
     [Event(data="x", event="b", raw=b"event: a\nevent: b\ndata: x\n\n")]),
    ("unknown and mis-cased fields ignored", b"foo: bar\nData: no\ndata: x\n\n",
     [Event(data="x", raw=b"foo: bar\nData: no\ndata: x\n\n")]),
    ("fields without data dispatch nothing", b"event: x\nretry: 10\n\n",
     [Passthrough(raw=b"event: x\nretry: 10\n\n")]),
    ("event type does not leak into the next event", b"event: x\n\ndata: y\n\n",
     [Passthrough(raw=b"event: x\n\n"), Event(data="y", raw=b"data: y\n\n")]),
    ("stray blank lines", b"\n\r\n\rdata: x\n\n",
     [Passthrough(raw=b"\n"), Passthrough(raw=b"\r\n"), Passthrough(raw=b"\r"),
      Event(data="x", raw=b"data: x\n\n")]),
    ("comment", b": ping\n\n", [Passthrough(raw=b": ping\n\n", comment="ping")]),
    ("empty comment", b":\n\n", [Passthrough(raw=b":\n\n", comment="")]),
    ("comment lines join", b": a\n:b\n\n", [Passthrough(raw=b": a\n:b\n\n", comment="a\nb")]),
    ("comment inside an event", b"data: a\n: ping\ndata: b\n\n",
     [Event(data="a\nb", raw=b"data: a\n: ping\ndata: b\n\n")]),
    ("bom stripped", BOM + b"data: x\n\n", [Event(data="x", raw=BOM + b"data: x\n\n")]),
    ("bom before a comment", BOM + b": hi\n\n", [Passthrough(raw=BOM + b": hi\n\n", comment="hi")]),
    ("only one bom stripped", BOM + BOM + b"data: x\n\n", [Passthrough(raw=BOM + BOM + b"data: x\n\n")]),
    ("bom later is not stripped", b"data: a\n\n" + BOM + b"data: b\n\n",
     [Event(data="a", raw=b"data: a\n\n"), Passthrough(raw=BOM + b"data: b\n\n")]),
    ("bom in a value is kept", b"data: " + BOM + b"x\n\n",
     [Event(data="\ufeffx", raw=b"data: " + BOM + b"x\n\n")]),
    ("multi-byte utf-8", "data: é€😀\n\n".encode(),
     [Event(data="é€😀", raw="data: é€😀\n\n".encode())]),
    ("invalid utf-8 replaced", b"event: \xffx\ndata: a\xe2\x82b\xc3\n\n",
     [Event(data="a\ufffdb\ufffd", event="\ufffdx", raw=b"event: \xffx\ndata: a\xe2\x82b\xc3\n\n")]),
    ("done", DONE, [Event(data="[DONE]", raw=DONE)]),
    ("tail without blank line", b"data: a\n\ndata: b\n",
     [Event(data="a", raw=b"data: a\n\n"), Passthrough(raw=b"data: b\n", truncated=True)]),
    ("tail without line end", b"data: a", [Passthrough(raw=b"data: a", truncated=True)]),
    ("tail of comments", b": x\n: y", [Passthrough(raw=b": x\n: y", comment="x", truncated=True)]),
    ("final bare cr ends the line at close", b"data: a\r", [Passthrough(raw=b"data: a\r", truncated=True)]),
    ("final cr cr dispatches at close", b"data: a\r\r", [Event(data="a", raw=b"data: a\r\r")]),
    ("empty stream", b"", []),
]


@pytest.mark.parametrize(("data", "expected"), [case[1:] for case in EDGE_CASES],
                         ids=[case[0] for case in EDGE_CASES])
def test_edge_case(data: bytes, expected: list[Item]):
    assert decode(data) == expected
    assert assert_split_invariant(data) == expected


@pytest.mark.parametrize(("chunks", "per_feed"), [
    # a CRLF split between CR and LF: the event waits for the LF, which its raw owns
    ([b"data: a\r\n\r", b"\n"], [[], [Event(data="a", raw=b"data: a\r\n\r\n")]]),
    ([b"data: a\r", b"\n\r", b"\n"], [[], [], [Event(data="a", raw=b"data: a\r\n\r\n")]]),
    # a bare CR is known to be one only when the next byte comes
    ([b"data: a\r\r", b"d", b"ata: b\r\r"], [[], [Event(data="a", raw=b"data: a\r\r")], []]),
    # a multi-byte character split three ways
    ([b"data: \xf0\x9f", b"\x98", b"\x80\n\n"],
     [[], [], [Event(data="😀", raw="data: 😀\n\n".encode())]]),
    # a BOM split: still stripped
    ([b"\xef", b"\xbb\xbfdata: x\n", b"\n"], [[], [], [Event(data="x", raw=BOM + b"data: x\n\n")]]),
    # keep-alives are returned as soon as their block ends
    ([b": ping\n\n: pi", b"ng\n\ndata: x\n"], [[Passthrough(raw=b": ping\n\n", comment="ping")],
                                              [Passthrough(raw=b": ping\n\n", comment="ping")]]),
])
def test_feed_returns_what_each_chunk_completes(chunks: list[bytes], per_feed: list[list[Item]]):
    decoder = SSEDecoder()
    assert [decoder.feed(chunk) for chunk in chunks] == per_feed


# --- limits, lifecycle, errors -------------------------------------------------------

@pytest.mark.parametrize(("chunks", "raises"), [
    ([b"data: " + b"x" * 100], True),  # one line that never ends
    ([b"data: " + b"x" * 20, b"x" * 80], True),  # growing across feeds
    ([b"data: " + b"x" * 60 + b"\n\n"], True),  # complete, but too large
    ([b": " + b"p" * 100 + b"\n"], True),  # comments count too
    ([b"data: " + b"x" * 56 + b"\n\n"], False),  # exactly 64 bytes
    ([b"data: xx\n\n" * 100], False),  # a large chunk of small events
    ([b"data: " + b"x" * 55 + b"\n\r", b"\n"], False),  # held at its CR, then 64 with the LF
    ([b"data: " + b"x" * 56 + b"\n\r", b"\n"], True),  # the LF makes it 65
])
def test_max_event_bytes(chunks: list[bytes], raises: bool):
    decoder = SSEDecoder(max_event_bytes=64)
    if raises:
        with pytest.raises(EventTooLarge, match="max_event_bytes=64"):
            for chunk in chunks:
                decoder.feed(chunk)
        with pytest.raises(SSEError):
            decoder.feed(b"\n\n")  # a decoder that gave up stays given up
    else:
        for chunk in chunks:
            decoder.feed(chunk)
        decoder.close()


def test_close_is_final():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.close() == [Passthrough(raw=b"data: a\n", truncated=True)]
    assert decoder.close() == []
    with pytest.raises(SSEError, match="after close"):
        decoder.feed(b"\n")


@pytest.mark.parametrize("data", ["", "{", "[DONE]", "{'a': 1}", '{"a": 1} x', "x" * 200])
def test_json_error_is_a_clear_value_error(data: str):
    event = Event(data=data, raw=b"")
    with pytest.raises(EventJSONError, match="event data is not JSON") as info:
        event.json()
    assert isinstance(info.value, ValueError) and isinstance(info.value, SSEError)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(("data", "is_done"),
                         [("[DONE]", True), (" [DONE]", False), ("[DONE]\n", False), ("", False)])
def test_is_done(data: str, is_done: bool):
    assert Event(data=data, raw=b"").is_done is is_done


# --- encoders ------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "kwargs", "encoded"), [
    (("x",), {}, b"data: x\n\n"),
    (("",), {}, b"data: \n\n"),
    (("a\nb",), {}, b"data: a\ndata: b\n\n"),
    (("a\r\nb\rc\n",), {}, b"data: a\ndata: b\ndata: c\ndata: \n\n"),
    ((" lead",), {}, b"data:  lead\n\n"),
    (("é",), {"event": "response.output_text.delta"},
     "event: response.output_text.delta\ndata: é\n\n".encode()),
])
def test_encode_event(args: tuple, kwargs: dict, encoded: bytes):
    assert encode_event(*args, **kwargs) == encoded
    (event,) = decode(encoded)
    assert event.data == re.sub(r"\r\n?", "\n", args[0]) and event.event == kwargs.get("event")


def test_encode_event_refuses_a_line_break_in_the_name():
    with pytest.raises(ValueError, match="line break"):
        encode_event("x", event="a\ndata: injected")


def test_encode_json_and_done():
    obj = {"error": {"message": "Zürich\nline", "type": "server_error", "param": None, "code": None}}
    encoded = encode_json(obj)
    assert encoded == ('data: {"error":{"message":"Zürich\\nline","type":"server_error",'
                       '"param":null,"code":null}}\n\n').encode()
    assert [event.json() for event in events(encoded + DONE)[:1]] == [obj]
    assert events(DONE)[0].is_done and DONE == encode_event("[DONE]")


def test_lone_surrogates_are_encoded_not_raised():
    # json.loads('"\\ud800"') is a str UTF-8 cannot hold; an upstream or client can send it.
    obj = {"choices": [{"delta": {"content": json.loads('"a\\ud800b\\ud83d\\ude00"')}}]}
    encoded = encode_json(obj)
    assert encoded == b'data: {"choices":[{"delta":{"content":"a\\ud800b\\ud83d\\ude00"}}]}\n\n'
    assert events(encoded)[0].json() == obj  # carried unchanged
    assert encode_event("x\ud800y") == "data: x\ufffdy\n\n".encode()
    assert encode_event("\U0001f600") == "data: \U0001f600\n\n".encode()


def test_encode_json_matches_vllm_bytes():
    first = fixture("stream_raw.txt").split(b"\n\n")[0] + b"\n\n"
    assert encode_json(events(first)[0].json()) == first


# UTF-8 text (no lone surrogates: those are tested on their own below).
_utf8 = st.characters(blacklist_categories=("Cs",))
_line_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=8)


@settings(max_examples=100, deadline=None, database=None)
@given(
    stream=st.lists(st.tuples(st.text(_utf8, max_size=20), st.none() | _line_text.filter(bool),
                              st.none() | _line_text), max_size=6),
    ending=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    bom=st.booleans(),
    cut_seeds=st.lists(st.integers(0, 10**6), max_size=8),
)
def test_encoded_streams_decode_back_at_any_split(stream, ending, bom, cut_seeds):
    """encode_event, with comments between, any line ending and any cuts, decodes back."""
    data = BOM if bom and stream else b""  # a lone BOM is an unterminated block
    for text, name, comment in stream:
        if comment is not None:
            data += b":" + comment.encode() + b"\n\n"
        data += encode_event(text, event=name)
    data = data.replace(b"\n", ending)
    cuts = sorted({seed % (len(data) + 1) for seed in cut_seeds})
    items = decode(data, cuts)
    assert b"".join(item.raw for item in items) == data
    assert items == decode(data)
    got = [(item.data, item.event) for item in items if isinstance(item, Event)]
    assert got == [(re.sub(r"\r\n?", "\n", text), name) for text, name, _ in stream]
    comments = [comment for _, _, comment in stream if comment is not None]
    assert [item.comment for item in items if isinstance(item, Passthrough)] == \
        [comment.removeprefix(" ") for comment in comments]
