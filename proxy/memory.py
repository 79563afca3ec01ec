"""The Responses turns the proxy guarded, remembered by response id.

A Responses request that names a `previous_response_id` makes the turns the upstream
stored under that id part of the model's context, though the request carries only its
new `input`. So that the guard reads what the model reads, the proxy remembers, for
each reply it guarded and the upstream stored (the request did not say `store: false`),
the conversation the guard read for that turn (the earlier turns it continued, then its
input, then its output), and a later request that chains from that id is scored with
that conversation before its own input (`policies.extract.prompt_text`'s `context`).

A reply the proxy withheld is remembered as such: one it cut ("cut"), or did not read
to its end ("unread": a stream whose client left, that broke off or failed closed; a
background response, whose output comes later). The upstream holds its whole text, which
the client never got past the guard, so a request chaining from it is refused as a
harmful prompt is (`policies.decisions.decide_continuation`), and so is one chaining
from any turn after it. Refusals the proxy wrote itself (`resp-siren-...`) exist nowhere
upstream and are known by their id alone (`REFUSAL_ID_PREFIX`), remembered or not.

Entries are keyed by partition (the proxy API key's name and the upstream's name) and
id, so one key never continues from another key's turn, and an id means what its own
upstream stored. Bounded in bytes (the text held, as UTF-8, and a fixed allowance a
turn and an entry), least recently used out first; the bound is read from the config by
every Responses request (`server.responses_memory_mb`), so after a reload that lowers it
the next one evicts down to it, and 0 empties the memory and stops it. One process's
memory: another replica, or this one restarted, does not know the ids (the policy's
`unknown_previous_response` decides).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

REFUSAL_ID_PREFIX = "resp-siren-"  # `proxy.shapes.refused_json`'s Responses id
ENTRY_BYTES = 256  # the allowance of an entry (its key, its record) beside its text
TURN_BYTES = 64  # ... and of each (role, text) turn in it


@dataclass(frozen=True)
class Remembered:
    """What the proxy knows of one guarded reply: the conversation the guard read, as
    (role, text) turns in `policies.extract` form (the reply itself last, as
    `assistant`), and whether the proxy withheld it, or a turn before it: "cut" (cut, or
    refused), "unread" (not read to its end), or None; and whether reading this reply
    whole later would settle it (`settles`: it is "unread" for itself alone)."""

    conversation: tuple[tuple[str, str], ...]
    withheld: str | None = None
    # "unread" for this reply alone (none before it withheld): a retrieval that reads it
    # whole, and passes, makes it a turn like any other (`proxy.retrieval`)
    settles: bool = False

    @property
    def nbytes(self) -> int:
        return ENTRY_BYTES + sum(TURN_BYTES + len(role) + len(text.encode("utf-8", "surrogatepass"))
                                 for role, text in self.conversation)


class ResponsesMemory:
    """An LRU of `Remembered` turns bounded in bytes. The bound is each call's `limit`
    (bytes; 0: off, and what was held is dropped). A turn's conversation holds the turns
    before it whole, so it is counted whole, although the strings it shares with the
    entry it continued are held once: the bound is never exceeded."""

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[Hashable, str], Remembered] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, partition: Hashable, response_id: str, *, limit: int) -> Remembered | None:
        self.trim(limit)
        entry = self._entries.get((partition, response_id))
        if entry is not None:
            self._entries.move_to_end((partition, response_id))
        return entry

    def remember(self, partition: Hashable, response_id: str, entry: Remembered, *, limit: int) -> None:
        key = (partition, response_id)
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        if entry.nbytes <= limit:  # one larger than the whole bound is not kept
            self._entries[key] = entry
            self.nbytes += entry.nbytes
        self.trim(limit)

    def trim(self, limit: int) -> None:
        """Evict down to `limit` bytes (a bound a reload lowered)."""
        while self.nbytes > limit:
            _, entry = self._entries.popitem(last=False)
            self.nbytes -= entry.nbytes


@dataclass(frozen=True)
class MemoryView:
    """The memory as one request sees it: its partition and the bound in force for it."""

    memory: ResponsesMemory
    partition: Hashable
    limit: int  # bytes; 0: off

    @classmethod
    def of(cls, memory: ResponsesMemory, *, key_name: str | None, upstream: str, megabytes: float) -> MemoryView:
        return cls(memory, (key_name, upstream), int(megabytes * 1024 * 1024))

    def get(self, response_id: str) -> Remembered | None:
        return self.memory.get(self.partition, response_id, limit=self.limit)

    def remember(self, response_id: str, entry: Remembered) -> None:
        self.memory.remember(self.partition, response_id, entry, limit=self.limit)


@dataclass(frozen=True)
class Chain:
    """Where a Responses request stands in its conversation, as far as the proxy knows:
    the turns it continues (`context`), whether they end in a reply the proxy withheld
    (`withheld`: "cut", or "unread" for one it did not read to its end), and the field
    naming turns the proxy does not know (`unknown`: "previous_response_id" or
    "conversation"), if any."""

    context: tuple[tuple[str, str], ...] = ()
    withheld: str | None = None
    unknown: str | None = None

    @property
    def reason(self) -> str | None:
        """What the prompt stage's decision says when it refuses for the turn continued."""
        return None if self.withheld is None else f"previous_response_{self.withheld}"


def look_up(view: MemoryView | None, payload: Mapping,
            conversation: tuple[tuple[str, str], ...] | None = None) -> Chain:
    """The `Chain` of a Responses request. A `conversation` is not remembered (items are
    added to one outside the requests the proxy guards, `POST conversations/{id}/items`):
    its turns are those read from the upstream (`proxy.conversations`), or unknown where
    none were read (`conversation` None)."""
    if view is not None:  # a bound a reload lowered holds from the next request on, chained or not
        view.memory.trim(view.limit)
    previous = payload.get("previous_response_id")
    if payload.get("conversation") is not None:
        return Chain(unknown="conversation") if conversation is None else Chain(conversation)
    if not isinstance(previous, str) or not previous:  # none, or a value the upstream refuses
        return Chain()
    if previous.startswith(REFUSAL_ID_PREFIX):  # the proxy's own refusal: refused again
        return Chain(withheld="cut")
    entry = view.get(previous) if view is not None else None
    if entry is None:
        return Chain(unknown="previous_response_id")
    return Chain(entry.conversation, entry.withheld)
