"""Fixtures shared by every test package: loopback peers and a proxy factory."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from tests.support.servers import LiveServer, katan
from tests.support.upstream import Recorder, build_upstream


@pytest.fixture(scope="session")
def katan_url(tmp_path_factory) -> Iterator[str]:
    """llm-katan's echo backend: streams '[echo] ...\\nUser: <last user message>' back."""
    with katan(str(tmp_path_factory.mktemp("katan"))) as url:
        yield url


@pytest.fixture(scope="session")
def scripted() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    with LiveServer(build_upstream(recorder)) as server:
        yield server.url + "/v1", recorder


@pytest.fixture
def start_katan(tmp_path) -> Callable[..., contextlib.AbstractContextManager[str]]:
    """A private llm-katan with fault-injection flags, for one test."""
    return lambda *flags: katan(str(tmp_path), *flags)
