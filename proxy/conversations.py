"""A Responses request's `conversation`, read: the turns the upstream keeps for it.

A request that names a conversation (the Conversations API) is answered after every item
the upstream keeps in it, though it carries only its new `input`; items are added outside
the requests the proxy guards (`POST conversations/{id}/items`), so the proxy cannot
remember them as it remembers `previous_response_id` chains (`proxy.memory`). Under the
conversation scopes, where the prompt stage reads the turns before the last, it asks the
upstream for them: `GET conversations/{id}/items`, newest first, a page of `PAGE` at a
time, until the oldest or until what it read is past what `server.max_prompt_bytes` lets
the guard read (the request is then too long to score, as a long chain is: the oldest
turns are never left out unread). The turns
are read as a Responses request's input items are (`policies.extract.responses_turn`), the
model's own replies among them. Under `last_user` the turns before the last are not read,
so nothing is asked.

The read goes to the route's upstream with the request's own credentials (or the
upstream's key), so it sees what the request will. An answer that is not a page of items
(a 404 for an unknown conversation, an error, a break) leaves the conversation unknown:
the request is scored on its input alone, or refused under `unknown_previous_response:
block`, as before.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import httpx

from policies.config import Policy
from policies.errors import RequestShapeError
from policies.extract import responses_turn

from .errors import ProxyError
from .relay import cleanup

PAGE = 100  # items a page (the Conversations API's largest)
MAX_PAGES = 100
CONVERSATION_SCOPES = ("conversation", "conversation_with_system")


def named(payload: dict, policy: Policy) -> str | None:
    """The conversation id a request names, where the prompt stage would read its turns;
    else None."""
    conversation = payload.get("conversation")
    conversation = conversation.get("id") if isinstance(conversation, dict) else conversation
    reads = policy.prompt.action != "off" or policy.response.action != "off" and policy.response.include_prompt
    if not isinstance(conversation, str) or not conversation or not reads:
        return None
    return conversation if policy.prompt.scope in CONVERSATION_SCOPES else None


def items_url(responses_url: str, conversation: str) -> str:
    """`.../responses` -> `.../conversations/{id}/items`: beside the Responses endpoint."""
    parts = urlsplit(responses_url)
    base = parts.path.rstrip("/").rsplit("/", 1)[0]
    return urlunsplit((parts.scheme, parts.netloc, f"{base}/conversations/{quote(conversation, safe='')}/items",
                       "", ""))


async def read(fetch: Callable[[str], Awaitable[httpx.Response]], url: str,
               limit: int | None) -> tuple[tuple[str, str], ...] | None:
    """The conversation's turns, oldest first, as (role, text); None where the upstream
    does not give them. `fetch(url)` GETs a URL from the upstream; `limit` is
    `server.max_prompt_bytes` (None: no bound)."""
    pages: list[list[tuple[str, str]]] = []  # newest page first, each page's turns oldest first
    after, size = None, 0
    for _ in range(MAX_PAGES):
        query = {"order": "desc", "limit": str(PAGE), **({"after": after} if after else {})}
        try:
            response = await fetch(f"{url}?{urlencode(query)}")
            try:
                if response.status_code != 200:
                    return None
                data = await response.aread()
            finally:
                with cleanup():
                    await response.aclose()
        except (ProxyError, httpx.HTTPError):
            return None
        try:
            page = json.loads(data)
        except ValueError:
            return None
        if not isinstance(page, dict) or not isinstance(page.get("data"), list):
            return None
        try:  # read once, as the guard reads a request's input items
            turns = responses_turn({"input": page["data"][::-1]}) or []
        except RequestShapeError:
            return None
        pages.append(turns)
        size += sum(len(text.encode()) for _, text in turns)  # past `limit`, the prompt is too long
        if not page["data"] or page.get("has_more") is not True or limit is not None and size > limit:
            break
        after = page.get("last_id") or (page["data"][-1].get("id") if isinstance(page["data"][-1], dict) else None)
        if not isinstance(after, str):
            return None  # more pages, and no way to ask for them: older turns would go unread
    else:
        return None  # more than MAX_PAGES pages (and no bound reached): older turns would go unread
    return tuple(turn for turns in reversed(pages) for turn in turns)
