"""Which endpoint a request reaches, read from the end of the upstream URL's path.

The guarded endpoints are known by their last segments wherever the route mounts them
(`base_url: http://vllm:8000/v1` under `/v1`, or `base_url: http://vllm:8000` under `/`:
either way `.../chat/completions` is chat), so no mount leaves them unguarded.

The Anthropic Messages API (`/v1/messages`, which vLLM, llama.cpp and LiteLLM serve
beside the OpenAI endpoints) is guarded too, as "messages", and vLLM's batch chat
completions (`chat/completions/batch`, one conversation per choice: `proxy.batch`).

Some other endpoints run the model on a client's text, or hand back text it generated
earlier, in shapes the guard does not read. Generation: vLLM's structured decisions and
its SageMaker `invocations` (at the server's root: any chat or completions body, whichever
its shape fits), the Batch API, whose requests run later upstream, and servers' own formats beside their
OpenAI ones (llama.cpp's `/completion`, `/infill` and Vertex `/predict`, TGI's and
Ollama's `generate`, Ollama's `api/chat`), which a route mounted above `/v1` reaches;
other providers' formats that gateways serve beside OpenAI's (Gemini's and Vertex AI's
`model:generateContent`-style methods, Bedrock's `invoke` and `converse`, Cohere's
chat); OpenAI's Assistants runs. Retrieval: an Assistants thread's messages and run steps,
llama.cpp's resumable streams; a stream the proxy cut is still whole upstream. (A stored
Responses reply read back, `GET responses/{id}` or its cancellation, is guarded:
`proxy.retrieval`; so are stored chat completions and a conversation's items:
`proxy.stored`.) `proxy.handler.refuse_unguarded` refuses them where they would
evade a stage that enforces.

Segments are compared decoded and without regard to case (`folded`), as an upstream may read them (`/v1/chat/%63ompletions` is
chat: `policies.routing.normalize_path` decodes escaped letters before routing, and
`segments` every escape, so `models/m%3AgenerateContent` is Gemini's too).

llama.cpp also serves its own format at `/completions` (no `/v1`), a path read here as
OpenAI's: the guard reads the prompt, and a reply it cannot read is a guard failure,
which meets the policy's `on_guard_error` (`proxy.whole`, `proxy.stream_guard.readable`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from policies.config import fold_segment

T = TypeVar("T")

# (last segments, endpoint), longest first: chat/completions before completions
GUARDED = ((("chat", "completions", "batch"), "chat/completions/batch"),
           (("chat", "completions"), "chat/completions"), (("v1", "messages"), "messages"),
           (("completions",), "completions"), (("responses",), "responses"))


@dataclass(frozen=True)
class Unread:
    """An endpoint that generates (`stage` "prompt": it evades both stages) or returns
    generated text (`stage` "response": it evades the response stage)."""

    method: str
    tail: tuple[str, ...]  # the path's last segments, as `fnmatch` patterns ("*" is any one segment)
    what: str
    stage: str


UNREAD = (
    Unread("POST", ("systemone",), "vLLM's structured decisions", "prompt"),
    Unread("POST", ("invocations",), "vLLM's SageMaker entry point (chat, completions, ... chosen by the body's "
           "shape)", "prompt"),
    # Servers' own generation formats, which a route mounted above `/v1` reaches:
    Unread("POST", ("completion",), "llama.cpp's own completion format", "prompt"),
    Unread("POST", ("infill",), "llama.cpp's code infill", "prompt"),
    Unread("POST", ("predict",), "a Vertex AI predict route (llama.cpp's, which runs any endpoint)", "prompt"),
    Unread("POST", ("generate",), "a native generate endpoint (TGI, Ollama's api/generate, vLLM's token-in "
           "generate)", "prompt"),
    Unread("POST", ("generate_stream",), "TGI's streaming generate", "prompt"),
    Unread("POST", ("api", "chat"), "Ollama's own chat format", "prompt"),
    # Other providers' formats, which gateways (LiteLLM, llm-katan) serve beside OpenAI's:
    Unread("POST", ("*:generateContent",), "Gemini's generateContent", "prompt"),
    Unread("POST", ("*:streamGenerateContent",), "Gemini's streamGenerateContent", "prompt"),
    Unread("POST", ("*:predict",), "a Vertex AI predict", "prompt"),
    Unread("POST", ("*:rawPredict",), "a Vertex AI rawPredict", "prompt"),
    Unread("POST", ("*:streamRawPredict",), "a Vertex AI streamRawPredict", "prompt"),
    Unread("POST", ("model", "*", "invoke"), "Bedrock's invoke", "prompt"),
    Unread("POST", ("model", "*", "invoke-with-response-stream"), "Bedrock's streamed invoke", "prompt"),
    Unread("POST", ("model", "*", "converse"), "Bedrock's converse", "prompt"),
    Unread("POST", ("model", "*", "converse-stream"), "Bedrock's converse-stream", "prompt"),
    Unread("POST", ("v1", "chat"), "Cohere's chat", "prompt"),
    Unread("POST", ("v2", "chat"), "Cohere's chat", "prompt"),
    # OpenAI's Assistants API: runs generate later, their messages are read back
    Unread("POST", ("threads", "runs"), "an Assistants run", "prompt"),
    Unread("POST", ("threads", "*", "runs"), "an Assistants run", "prompt"),
    Unread("POST", ("threads", "*", "runs", "*", "submit_tool_outputs"), "an Assistants run", "prompt"),
    Unread("POST", ("batches",), "the Batch API (its requests run later, upstream)", "prompt"),
    Unread("GET", ("threads", "*", "messages"), "an Assistants thread's messages", "response"),
    Unread("GET", ("threads", "*", "messages", "*"), "an Assistants thread's message", "response"),
    Unread("GET", ("threads", "*", "runs", "*", "steps"), "an Assistants run's steps", "response"),
    Unread("GET", ("threads", "*", "runs", "*", "steps", "*"), "an Assistants run's step", "response"),
    Unread("GET", ("stream", "*"), "llama.cpp's resumable stream (a generation replayed)", "response"),
    Unread("POST", ("streams", "lookup"), "llama.cpp's resumable stream lookup", "response"),
)


def cached_by_url(function: Callable[..., T]) -> Callable[..., T]:
    """`function`, a pure function of its arguments whose last is a URL, cached for URLs
    of up to 1,024 characters: asked on every request for the same few URLs, a request
    pays a dict lookup instead of parsing (tens of microseconds). Longer URLs are worked
    out each time, so the 1,024 entries hold about a megabyte whatever clients send."""
    cached = functools.lru_cache(maxsize=1024)(function)

    @functools.wraps(function)
    def call(*args: Any) -> T:
        return cached(*args) if len(args[-1]) <= 1024 else function(*args)

    call.cache_info = cached.cache_info
    return call


@cached_by_url
def segments(url: str) -> tuple[str, ...]:
    """The URL's path segments as the upstream reads them, percent-escapes decoded (the
    escapes that could change the segments themselves, `%2f` and `%2e`, are refused
    before: `policies.routing.check_path`)."""
    return tuple(unquote(s) for s in urlsplit(url).path.split("/") if s)


def folded(url: str) -> tuple[str, ...]:
    """`segments`, lower-cased and without matrix parameters, for knowing endpoints:
    Express (Node's usual router) and ASP.NET route paths without regard to case, and
    Tomcat and Spring strip `;params` from each segment, so `/v1/Chat/Completions` and
    `/v1/chat/completions;x=1` are chat to such upstreams, and must be to the guard
    (vLLM's router answers them 404 after the guard has read them, which costs a score
    and opens nothing)."""
    return _fold(segments(url))


def folded_path(path: str) -> tuple[str, ...]:
    """`folded` for a request's path alone, which has no scheme or authority to split off
    (`urlsplit` reads a path that starts with `//` as an authority)."""
    return _fold(unquote(s) for s in path.split("?", 1)[0].split("/") if s)


def _fold(segments: Iterable[str]) -> tuple[str, ...]:
    return tuple(map(fold_segment, segments))


def guarded_endpoint(method: str, url: str) -> str | None:
    """"chat/completions", "completions", "responses", "messages" or
    "chat/completions/batch" (vLLM's) for a POST to one, else None."""
    if method != "POST":
        return None
    path = folded(url)
    return next((endpoint for tail, endpoint in GUARDED if path[-len(tail):] == tail), None)


@cached_by_url
def unread_endpoint(method: str, url: str) -> Unread | None:
    """The `UNREAD` entry `method url` reaches, if any."""
    path = folded(url)
    for entry in UNREAD:
        tail = path[-len(entry.tail):]
        if method == entry.method and len(tail) == len(entry.tail) and all(
                fnmatchcase(got, want.lower()) for want, got in zip(entry.tail, tail)):
            return entry
    return None
