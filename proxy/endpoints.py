"""Which endpoint a request reaches, read from the end of the upstream URL's path.

The guarded endpoints are known by their last segments wherever the route mounts them
(`base_url: http://vllm:8000/v1` under `/v1`, or `base_url: http://vllm:8000` under `/`:
either way `.../chat/completions` is chat), so no mount leaves them unguarded.

The Anthropic Messages API (`/v1/messages`, which vLLM, llama.cpp and LiteLLM serve
beside the OpenAI endpoints) is guarded too, as "messages", and vLLM's batch chat
completions (`chat/completions/batch`, one conversation per choice: `proxy.batch`).

Some other endpoints run the model on a client's text, or hand back text it generated
earlier, in shapes the guard does not read. Generation: vLLM's structured decisions, and
the Batch API, whose requests run later upstream. Retrieval: a
stored or background Responses response (also replayed as a stream), stored chat
completions, a conversation's items; a stream the proxy cut is still whole upstream.
`proxy.handler.refuse_unguarded` refuses them where they would evade a stage that
enforces.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

# (last segments, endpoint), longest first: chat/completions before completions
GUARDED = ((("chat", "completions", "batch"), "chat/completions/batch"),
           (("chat", "completions"), "chat/completions"), (("v1", "messages"), "messages"),
           (("completions",), "completions"), (("responses",), "responses"))


@dataclass(frozen=True)
class Unread:
    """An endpoint that generates (`stage` "prompt": it evades both stages) or returns
    generated text (`stage` "response": it evades the response stage)."""

    method: str
    tail: tuple[str, ...]  # the path's last segments; "*" is any one segment
    what: str
    stage: str


UNREAD = (
    Unread("POST", ("systemone",), "vLLM's structured decisions", "prompt"),
    Unread("POST", ("batches",), "the Batch API (its requests run later, upstream)", "prompt"),
    Unread("GET", ("responses", "*"), "a stored or background response", "response"),
    Unread("GET", ("chat", "completions"), "stored chat completions", "response"),
    Unread("GET", ("chat", "completions", "*"), "a stored chat completion", "response"),
    Unread("GET", ("conversations", "*", "items"), "a conversation's items", "response"),
    Unread("GET", ("conversations", "*", "items", "*"), "a conversation's item", "response"),
)


def segments(url: str) -> tuple[str, ...]:
    return tuple(s for s in urlsplit(url).path.split("/") if s)


def guarded_endpoint(method: str, url: str) -> str | None:
    """"chat/completions", "completions", "responses", "messages" or
    "chat/completions/batch" (vLLM's) for a POST to one, else None."""
    if method != "POST":
        return None
    path = segments(url)
    return next((endpoint for tail, endpoint in GUARDED if path[-len(tail):] == tail), None)


def unread_endpoint(method: str, url: str) -> Unread | None:
    """The `UNREAD` entry `method url` reaches, if any."""
    path = segments(url)
    for entry in UNREAD:
        tail = path[-len(entry.tail):]
        if method == entry.method and len(tail) == len(entry.tail) and all(
                want in ("*", got) for want, got in zip(entry.tail, tail)):
            return entry
    return None
