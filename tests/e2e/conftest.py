"""Fixtures for the tests against a real vLLM server (marked `vllm`, left out of CI)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .vllm_server import vllm_server


@pytest.fixture(scope="session")
def vllm_url(tmp_path_factory) -> Iterator[str]:
    """vLLM serving SmolLM2-135M-Instruct as `smollm2`; installed on first use (minutes).

    `SIREN_E2E_VLLM_URL=http://127.0.0.1:8011/v1` uses a server already running
    (`serve.sh --served-model-name smollm2`) instead of starting one.
    """
    if os.environ.get("SIREN_E2E_VLLM_URL"):
        yield os.environ["SIREN_E2E_VLLM_URL"].rstrip("/")
        return
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with vllm_server(log) as url:
        yield url
