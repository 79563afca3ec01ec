"""A cache of scored token prefixes shared by a guard's stream sessions.

Requests to one proxy repeat long token prefixes: a multi-turn conversation resends its
history with every turn (the `conversation` scopes), an application puts the same system
prompt before every message (`conversation_with_system`), a client retries or
regenerates the same prompt, and the choices of an n>1 request share theirs. A session
whose text starts with a prefix some earlier session already ran need not run it again:
a causal backbone's states for a prefix are the same whatever follows, which is the
property that makes a session's own checks exact, so taking over that session's state
and feeding only the rest is exact too.

- After a session has scored its prompt (before any response), a copy of its state goes
  in: the body token ids, the scores of its completed windows, and the KV cache and
  per-token rows of its last window and of the one before it, if the prefill ran that
  one (`_Window.copy`). Windows overlap by half, so every token is in at most those two.
- A new session, before it feeds anything, takes the entry that covers most of its text
  (the longest common token prefix, if a cached window starts inside it) and continues
  from copies of it: completed windows that end inside the prefix keep their scores, and
  a window the new text needs at a cached window's start continues that window, cut to
  the prefix by the session's usual rollback (`StreamSession._steps`). The entry stays
  for others. So a text that continues a cached one (the next turn of a conversation)
  runs only its new tokens, and one that shares only part of it (a system prompt) runs
  what follows the shared part, plus whatever the window layout adds: a text's windows
  are laid out from its start, so both texts have windows at the same starts.
- Bounded by bytes (`max_bytes`), least recently used out first. A window's KV cache
  costs 30 KB per token on SmolLM2-135M in float32 (20 kept blocks); with the shipped
  head's rows a full 256-token window is 9.5 MiB, so an entry holds at most about 19 MiB.
- Partitioned by a salt (`StreamSession.cache_salt`, as vLLM's `cache_salt` partitions
  its prefix cache): a session takes only entries that sessions with the same salt left.
  A hit makes a score arrive sooner, so a shared entry tells one client that another sent
  the same prefix; the proxy salts by API key and by the request's own `cache_salt`.
- With static steps (a GPU) windows live in preallocated slots and step as CUDA-graph
  replays. An entry keeps copies taken out of the slots, and a session that continues
  one copies it straight into a free slot (`StaticStepper.load`: a few device copies
  where the prefill is one replay per 128 tokens), so its steps stay static; with no
  slot free it steps on a copy of its own, eagerly, as any window beyond the slots does.

Thread-safe (one lock), though a guard's sessions run on one thread anyway.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from guard.session import _Window, common_prefix

MIN_REUSE = 8  # tokens: below this, copying an entry is not worth it


@dataclass
class _Entry:
    salt: str | None  # the partition: only sessions with the same salt take this entry
    ids: tuple[int, ...]  # body tokens scored
    finals: dict[int, tuple[int, float]]  # completed window start -> (end, score)
    windows: list[_Window]  # copies owned by the cache: the last window, and the one before
    nbytes: int = field(default=0)


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be at least 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[str | None, tuple[int, ...]], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0  # sessions that took over a cached prefix
        self.misses = 0  # sessions that found none worth taking
        self.tokens_reused = 0  # body tokens those sessions did not run again

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, ids: list[int], finals: dict[int, tuple[int, float]], windows: list[_Window], *,
            salt: str | None = None, kept: list[_Window] = ()) -> None:
        """Keep a copy of a session's state after it scored `ids` (body tokens): its
        completed windows' scores and `windows` (the last one, and the one before it if
        this update ran it: every token is in at most two windows), for sessions salted
        `salt`. Those of `windows` also in `kept` are copies nobody steps again (a
        session's completed window): kept as they are, not copied again."""
        if not ids or self.max_bytes == 0:
            return
        key = (salt, tuple(ids))
        with self._lock:
            if key in self._entries:  # the same text again: only its recency changes
                self._entries.move_to_end(key)
                return
        copies = [w if any(w is k for k in kept) else w.copy() for w in windows]
        entry = _Entry(salt, key[1], dict(finals), copies)
        entry.nbytes = 64 * len(ids) + sum(w.nbytes for w in copies)  # a tuple slot and an int per token
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = entry
            self.nbytes += entry.nbytes
            while self.nbytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes

    def take(self, ids: list[int], prefix: int, *,
             salt: str | None = None) -> tuple[list[int], dict, list[_Window]] | None:
        """The state to continue from for a text of body tokens `ids`, from the entries
        salted `salt`: (ids kept, finals, the entry's windows that start inside the
        common prefix), or None. The session steps only `_Window.continued` copies of
        those windows. `prefix` is the tokenizer's special-prefix length (windows count
        it in `n`)."""
        best, best_cover, best_keep, best_windows = None, 0, 0, []
        with self._lock:
            for entry in reversed(self._entries.values()):  # most recent first
                if entry.salt != salt:
                    continue
                keep = common_prefix(entry.ids, ids)
                # the session drops a window that starts past the common prefix
                usable = [w for w in entry.windows if w.start < keep or (w.start == keep and prefix > 0)]
                cover = keep if usable else max((end for end, _ in entry.finals.values() if end <= keep), default=0)
                if cover > best_cover:
                    best, best_cover, best_keep, best_windows = entry, cover, keep, usable
            if best is None or best_cover < MIN_REUSE:
                self.misses += 1
                return None
            self._entries.move_to_end((best.salt, best.ids))
            self.hits += 1
            self.tokens_reused += best_cover
        return list(best.ids[:best_keep]), dict(best.finals), best_windows

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0
