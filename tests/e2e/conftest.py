"""Fixtures for the tests against a real vLLM server (marked `vllm`, left out of CI)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .vllm_server import vllm_server


@pytest.fixture(scope="session")
def vllm_url(tmp_path_factory) -> Iterator[str]:
    """vLLM serving SmolLM2-135M-Instruct as `smollm2`; installed on first use (minutes)."""
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with vllm_server(log) as url:
        yield url
