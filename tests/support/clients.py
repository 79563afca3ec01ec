"""The official `openai` and `anthropic` SDKs pointed at a proxy, closed after each test.

An unclosed client leaks its socket, and with `filterwarnings = error` the
ResourceWarning would fail whichever test runs next.
"""

from __future__ import annotations

import openai
import pytest

_open: list = []  # openai and anthropic clients


def sdk(proxy, **kw) -> openai.OpenAI:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=kw.pop("api_key", "sk-client"), max_retries=0, **kw)
    _open.append(client)
    return client


@pytest.fixture(autouse=True)
def close_sdk_clients():
    yield
    while _open:
        _open.pop().close()


def anthropic_sdk(proxy, **kw):
    """The official `anthropic` SDK pointed at a proxy (it adds `/v1/messages` itself)."""
    import anthropic

    client = anthropic.Anthropic(base_url=proxy.url, api_key=kw.pop("api_key", "sk-client"), max_retries=0, **kw)
    _open.append(client)
    return client
