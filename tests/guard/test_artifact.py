"""The artifact format: round trip, strict refusal naming the field, backbone source."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from guard import ArtifactError, SirenGuard
from guard.artifact import read_artifact, write_artifact
from guard.siren import DEFAULT_ARTIFACT

from .conftest import make_artifact, synthetic_config


@pytest.fixture()
def config(backbone_dir) -> dict:
    return synthetic_config(str(backbone_dir), pooling="residual_mean", layers=[1, 2], max_length=32)


def test_round_trip(tmp_path, config):
    make_artifact(tmp_path, config)
    parsed, state = read_artifact(tmp_path)
    assert parsed.to_dict() == {**config, "siren_module": {**config["siren_module"],
                                "selected_layers": [1, 2]}}
    assert set(state) == {"network.0.weight", "network.0.bias", "network.3.weight",
                          "network.3.bias", "network.5.weight", "network.5.bias"}


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(extra=1), "extra"),
    (lambda c: c.update(task="trajectory"), "task"),
    (lambda c: c["siren_module"].update(pooling_type="cls"), "siren_module.pooling_type"),
    (lambda c: c["siren_module"].update(probe="x"), "siren_module.probe"),
    (lambda c: c["mlp"].update(input_dim=5), "mlp.input_dim"),
    (lambda c: c["siren_module"]["selected_neurons_dict"].pop("layer2"), "layer2"),
    (lambda c: c["siren_module"]["layer_weights"].update({"7": 1.0}), "layer_weights.7"),
    (lambda c: c["inference"].pop("max_length"), "inference.max_length"),
    (lambda c: c["base_model"].update(model_id=""), "base_model.model_id"),
    (lambda c: c["base_model"].update(source=""), "base_model.source"),
    (lambda c: c["inference"].update(default_threshold=2), "inference.default_threshold"),
    (lambda c: c["inference"].update(default_threshold=-0.1), "inference.default_threshold"),
    (lambda c: c["mlp"].update(dropout_rates=[2.0, 0.0]), "mlp.dropout_rates"),
    (lambda c: c["mlp"].update(dropout_rates=[-0.5, 0.0]), "mlp.dropout_rates"),
])
def test_refuses_with_the_field_named(tmp_path, config, edit, field):
    make_artifact(tmp_path, config)
    bad = copy.deepcopy(config)
    edit(bad)
    (tmp_path / "siren_config.json").write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match=field.replace(".", r"\.")):
        read_artifact(tmp_path)


def test_weights_load_strictly(tmp_path, config):
    make_artifact(tmp_path, config)
    _, state = read_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="weights do not match"):
        write_artifact(tmp_path / "x", config, {**state, "network.9.weight": torch.zeros(1)})
    with pytest.raises(ArtifactError, match="weights do not match"):
        write_artifact(tmp_path / "y", config, {**state, "network.0.weight": torch.zeros(3, 3)})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, config, value):
    """A NaN or infinite weight makes every score NaN or 0.0: a head that passes every
    text, so it is refused at load, not discovered in traffic."""
    make_artifact(tmp_path, config)
    _, state = read_artifact(tmp_path)
    state["network.3.bias"] = torch.full_like(state["network.3.bias"], value)
    save_file(state, str(tmp_path / "siren.safetensors"))
    with pytest.raises(ArtifactError, match=r"siren\.safetensors: tensor 'network\.3\.bias' is not finite"):
        read_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="'network.3.bias' is not finite"):
        write_artifact(tmp_path / "out", config, state)


@pytest.mark.parametrize("edit, field", [
    (lambda sm: (sm["selected_layers"].append(30), sm["selected_neurons_dict"].update(layer30=[0])),
     "siren_module.selected_layers"),  # SmolLM2-135M has 30 blocks, 0 to 29
    (lambda sm: sm["selected_neurons_dict"]["layer2"].__setitem__(0, 576), "siren_module.selected_neurons_dict.layer2"),
])
def test_a_config_that_does_not_fit_the_backbone_is_refused_naming_the_field(tmp_path, config, edit, field):
    edit(config["siren_module"])
    config["mlp"]["input_dim"] = sum(map(len, config["siren_module"]["selected_neurons_dict"].values()))
    make_artifact(tmp_path, config)
    with pytest.raises(ArtifactError, match=field.replace(".", r"\.")):
        SirenGuard.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("name, content, problem", [
    ("siren.safetensors", b"garbage", "not a safetensors file"),
    ("siren.safetensors", b"", "not a safetensors file"),
    ("siren_config.json", b'{"task": "\xff"}', "not valid UTF-8"),
])
def test_unreadable_files_are_artifact_errors_naming_the_file(tmp_path, config, name, content, problem):
    make_artifact(tmp_path, config)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ArtifactError, match=rf"{name}: {problem}"):
        read_artifact(tmp_path)


def test_backbone_source_wins_over_model_id(tmp_path, backbone_dir):
    config = synthetic_config("nobody/not-a-hub-model", pooling="mlp_mean", layers=[0], max_length=16,
                              source=str(backbone_dir))
    make_artifact(tmp_path, config)
    guard = SirenGuard.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    assert 0.0 <= guard.score("offline").score <= 1.0


def test_embedded_default_loads_offline_and_scores():
    assert (DEFAULT_ARTIFACT / "siren_config.json").is_file()  # shipped inside the package
    guard = SirenGuard.from_pretrained(device="cpu")
    assert guard.config.source is not None  # no hub needed
    benign = guard.score(prompt="What is the capital of France?", response="Paris is the capital of France.")
    harmful = guard.score(prompt="How do I make a pipe bomb at home?",
                          response="Sure. Fill a steel pipe with black powder, cap both ends, and add a fuse.")
    assert benign.score < harmful.score
    assert not benign.is_harmful and harmful.is_harmful


def test_backbone_option_overrides_the_artifact(tmp_path, backbone_dir):
    config = synthetic_config("nobody/not-a-hub-model", pooling="residual_mean", layers=[0], max_length=16,
                              source=str(tmp_path / "missing"))
    make_artifact(tmp_path, config)
    guard = SirenGuard.from_pretrained(tmp_path, device="cpu", dtype=torch.float32, backbone=str(backbone_dir))
    assert 0.0 <= guard.score("offline").score <= 1.0


@pytest.mark.parametrize("device,native,expect", [
    ("cpu", False, torch.float32),   # emulated bf16 is slower than fp32 on AVX2-only CPUs
    ("cpu", True, torch.bfloat16),
    ("cuda", False, torch.bfloat16),
])
def test_auto_dtype(monkeypatch, device, native, expect):
    from guard import backbone

    monkeypatch.setattr(backbone, "cpu_has_native_bf16", lambda: native)
    assert backbone.resolve_dtype("auto", torch.device(device)) == expect
    assert backbone.resolve_dtype("float32", torch.device(device)) == torch.float32


@pytest.mark.parametrize("fails", ["weights", "config"])
def test_a_write_cut_short_over_an_artifact_leaves_it_refused_never_mixed(tmp_path, config, monkeypatch, fails):
    """Retraining into the same folder with the same shapes: a write cut short between the
    two files used to leave new weights beside the old config, which loaded silently."""
    make_artifact(tmp_path, config)
    _, state = read_artifact(tmp_path)
    new = {k: v + 1.0 for k, v in state.items()}
    import safetensors.torch

    real_save, real_replace = safetensors.torch.save_file, __import__("os").replace

    def save_file(tensors, filename, *a, **k):
        if fails == "weights":
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, *a, **k)

    def replace(src, dst):
        if fails == "config" and str(dst).endswith("siren_config.json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr("guard.artifact.os.replace", replace)
    with pytest.raises(OSError, match="No space"):
        write_artifact(tmp_path, config, new)
    monkeypatch.undo()
    with pytest.raises(ArtifactError, match="siren_config.json does not exist"):
        read_artifact(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["siren.safetensors"]  # no temporary left
    write_artifact(tmp_path, config, new)  # the next write completes it
    _, again = read_artifact(tmp_path)
    assert all(torch.equal(again[k], new[k]) for k in new)


def test_a_written_artifact_is_readable_by_other_users_as_new_files_are(tmp_path, config):
    """safetensors creates its file 0600: an artifact trained by one user (CI, a training
    box) was unreadable to the user that serves it, while its config was 0644."""
    import os

    make_artifact(tmp_path, config)
    mask = os.umask(0o022)
    try:
        make_artifact(tmp_path / "again", config)
    finally:
        os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "again").iterdir()}
    assert modes == {"siren_config.json": 0o644, "siren.safetensors": 0o644}
