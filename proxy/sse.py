"""Sans-IO Server-Sent Events: bytes in, events out, no sockets (as uvicorn keeps h11).

`SSEDecoder.feed(chunk)` returns the items that `chunk` completes; `close()` ends the
stream. Parsing follows the WHATWG HTML "Server-sent events" section (LF, CRLF and bare CR
line endings; one leading BOM ignored; `field`, `field:value`, `field: value`; unknown
fields ignored) and keeps, next to what it parsed, the exact bytes it came from.

Invariants, and why the proxy needs them:

- Lossless: the `raw` of every item returned by `feed()` and `close()`, joined in order,
  equals the bytes fed, byte for byte. So the proxy can forward an upstream stream
  unchanged, or hold back one event, by forwarding `raw`s.
- Blocks: an item is a *block*, the lines up to and including the blank line that ends
  them. A block with at least one `data` field is an `Event`; any other block (keep-alive
  comments such as `: ping`, a stray blank line, `retry:` or `event:` without data: all
  dispatch nothing per spec) is a `Passthrough`, so its bytes can still be forwarded.
  A comment line inside an event stays in that event's `raw`.
- Split-invariant: the items do not depend on how the bytes were cut into chunks, also
  inside a multi-byte UTF-8 character or between the CR and LF of a CRLF (lines are split
  on bytes, and decoded only once whole).
- Prompt: an item is returned by the `feed()` that delivers its last byte. One exception:
  a block whose final blank line ends in a bare CR at the very end of the bytes so far is
  held until the next byte (or `close()`) shows whether an LF follows, so that `raw` owns
  the whole line ending. Only CR-only streams ever wait for this.
- Bounded: a block larger than `max_event_bytes` raises `EventTooLarge` instead of
  buffering without limit; the decoder then refuses further input.
- End of stream: per spec, a final block without its blank line is not dispatched;
  `close()` returns its bytes as a `Passthrough` with `truncated=True` (vLLM, llama.cpp
  and OpenAI always end with a blank line, so this means the upstream was cut off).
- Invalid UTF-8 becomes U+FFFD in `data`, `event`, `id` and comments (as a browser
  decodes); `raw` keeps the original bytes.

Exceptions:

    SSEError                    everything raised here
    ├── EventTooLarge           a block exceeded max_event_bytes
    └── EventJSONError          Event.json() on data that is not JSON (also a ValueError)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DONE",
    "Event",
    "EventJSONError",
    "EventTooLarge",
    "Item",
    "Passthrough",
    "SSEDecoder",
    "SSEError",
    "encode_event",
    "encode_json",
]

DONE = b"data: [DONE]\n\n"
MAX_EVENT_BYTES = 1 << 20

_BOM = b"\xef\xbb\xbf"
_EOL = re.compile(rb"\r\n?|\n")
_TEXT_EOL = re.compile(r"\r\n?|\n")


class SSEError(Exception):
    pass


class EventTooLarge(SSEError):
    pass


class EventJSONError(SSEError, ValueError):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """A dispatched event. `id` is the stream's last event ID as EventSource would report
    it (it persists until a later `id` field changes it); `retry` is the value of a valid
    `retry` field in this event's own block; `event` is None where the type is unset
    or empty (EventSource's "message")."""

    data: str
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    raw: bytes

    @property
    def is_done(self) -> bool:
        return self.data == "[DONE]"

    def json(self) -> Any:
        try:
            return json.loads(self.data)
        except json.JSONDecodeError as exc:
            snippet = self.data if len(self.data) <= 80 else self.data[:77] + "..."
            message = f"event data is not JSON ({exc.msg} at char {exc.pos}): {snippet!r}"
            raise EventJSONError(message) from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class Passthrough:
    """Bytes that dispatch no event but must still be forwarded. `comment` is the text of
    the block's comment lines joined with "\\n" (one leading space dropped from each), or
    None if it had none; `truncated` marks the unterminated tail returned by `close()`."""

    raw: bytes
    comment: str | None = None
    truncated: bool = False


Item = Event | Passthrough


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


class SSEDecoder:
    def __init__(self, *, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._buf = bytearray()  # the current block's bytes, from its first byte on
        self._line_start = 0  # where the next unparsed line begins in _buf
        self._scan = 0  # no line ending in _buf[_line_start:_scan]
        self._at_stream_start = True
        self._closed = False
        self._last_id: str | None = None
        self._reset_block()

    def _reset_block(self) -> None:
        self._data: list[bytes] = []
        self._event: bytes = b""
        self._retry: int | None = None
        self._comments: list[bytes] = []

    def feed(self, data: bytes) -> list[Item]:
        if self._closed:
            raise SSEError("feed() after close() or after an error")
        self._buf += data
        return self._parse(final=False)

    def close(self) -> list[Item]:
        """End of stream: returns what is left, the held block or an unterminated tail."""
        if self._closed:
            return []
        items = self._parse(final=True)
        self._closed = True
        if self._buf:
            comment = self._comment()
            items.append(Passthrough(raw=bytes(self._buf), comment=comment, truncated=True))
            self._buf.clear()
        return items

    def _parse(self, *, final: bool) -> list[Item]:
        buf = self._buf
        items: list[Item] = []
        block_start = 0
        line_start = self._line_start
        scan = self._scan
        while match := _EOL.search(buf, scan):
            if match.end() == len(buf) and match.group() == b"\r" and not final:
                scan = match.start()  # maybe half a CRLF: look again when more comes
                break
            blank = self._line(bytes(buf[line_start:match.start()]))
            line_start = scan = match.end()
            if blank:
                if line_start - block_start > self.max_event_bytes:
                    self._too_large(line_start - block_start)
                items.append(self._dispatch(bytes(buf[block_start:line_start])))
                block_start = line_start
        else:
            scan = len(buf)
        del buf[:block_start]
        self._line_start = line_start - block_start
        self._scan = scan - block_start
        if len(buf) > self.max_event_bytes:
            self._too_large(len(buf))
        return items

    def _too_large(self, size: int) -> None:
        self._closed = True
        raise EventTooLarge(f"SSE event of {size}+ bytes exceeds max_event_bytes={self.max_event_bytes}")

    def _line(self, line: bytes) -> bool:
        """Applies one line to the block being built; True for the blank line that ends it."""
        if self._at_stream_start:
            self._at_stream_start = False
            line = line.removeprefix(_BOM)
        if not line:
            return True
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if not name:
            self._comments.append(value)
        elif name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
        elif name == b"id":
            if b"\0" not in value:
                self._last_id = _text(value)
        elif name == b"retry":
            if value.isdigit():  # bytes.isdigit() is ASCII-only, as the spec asks
                self._retry = int(value)
        return False

    def _comment(self) -> str | None:
        return _text(b"\n".join(self._comments)) if self._comments else None

    def _dispatch(self, raw: bytes) -> Item:
        item: Item
        if self._data:
            item = Event(
                data=_text(b"\n".join(self._data)),
                event=_text(self._event) or None,
                id=self._last_id,
                retry=self._retry,
                raw=raw,
            )
        else:
            item = Passthrough(raw=raw, comment=self._comment())
        self._reset_block()
        return item


def encode_event(data: str, *, event: str | None = None) -> bytes:
    """`event: ...` then one `data: ` line per line of `data`, then the blank line.

    Decoding gives back `data` with its line endings (CR, CRLF) normalised to LF. A lone
    surrogate (JSON can carry one as ``"\\ud800"``, UTF-8 cannot) becomes U+FFFD.
    """
    text = _event_text(data, event)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def encode_json(obj: Any) -> bytes:
    """One `data:` event of compact JSON, as vLLM and OpenAI send chunks.

    Non-ASCII text is written as UTF-8, except when a string holds a lone surrogate
    (an upstream or client can send ``"\\ud800"``): then the whole event is written with
    JSON escapes, which carries it unchanged.
    """
    try:
        return _event_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":"))).encode("utf-8")
    except UnicodeEncodeError:
        return _event_text(json.dumps(obj, ensure_ascii=True, separators=(",", ":"))).encode("utf-8")


def _event_text(data: str, event: str | None = None) -> str:
    lines = []
    if event is not None:
        if _TEXT_EOL.search(event):
            raise ValueError(f"SSE event name contains a line break: {event!r}")
        lines.append(f"event: {event}\n")
    lines.extend(f"data: {line}\n" for line in _TEXT_EOL.split(data))
    lines.append("\n")
    return "".join(lines)
