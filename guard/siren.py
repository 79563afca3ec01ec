"""`SirenGuard`: load an llm-siren artifact and score text, as `siren_guard` does.

The public surface mirrors the reference runtime, so users switch by changing one
import: `from_pretrained`, `score`, `score_batch`, `score_streaming` (all returning
`ScoreResult`), plus `stream()` for exact incremental scoring of a growing response
(`guard.session`). Texts are cleaned and joined by `guard.text`, to the character.

Invariants:
- In float32 every score equals the reference's within float rounding for texts of up
  to `max_length` tokens; longer texts follow `guard.windows` (the reference truncates).
- An instance may be shared between threads, as the reference's may: its states are
  read through hooks into one buffer, so each forward-running call (`p_harmful`,
  `feed_rows`, a session's update) holds the instance's `lock`, and calls run one at a
  time. To serve many concurrent callers, batch them through `guard.worker.GuardWorker`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from transformers import DynamicCache

from guard.artifact import ArtifactConfig, load_head, read_artifact
from guard.backbone import Backbone, load_backbone
from guard.errors import Abandoned, ArtifactError, BackboneError, WorkerClosed
from guard.head import SirenHead
from guard.prefixes import PrefixCache
from guard.readout import Readout
from guard.result import ScoreResult
from guard.text import model_text, second_reading, visible_reading
from guard.windows import TokenPlan, text_score

logger = logging.getLogger(__name__)

DEFAULT_ARTIFACT = Path(__file__).resolve().parent / "default"
MAX_BATCH_TOKENS = 8192  # tokens per forward (padded ones included), to bound memory
# A forward's padded tokens may exceed its real ones by this share at most. On CPU a
# padded token costs what a real one does, while a forward of a few hundred rows already
# runs its matrix products near their best rate, so a batch of uneven lengths is cut
# into sub-batches of even ones (guard_bench (b) and (d)). On a GPU the opposite holds:
# a forward of this backbone costs its ~800 kernel launches, padded or not (measured on an
# H100: one 512-token forward 15-20 ms, almost all launch time), so there every window
# goes into as few forwards as MAX_BATCH_TOKENS allows.
MAX_PAD_SHARE = 0.15
DEFAULT_PREFIX_CACHE_MB = 256.0  # `guard.prefixes`: about 32 full windows of SmolLM2-135M in float32
EMOJI_RULES = ("read", "max")  # `SirenGuard(emoji=)`: a text as written, or as read and read again


def max_pad_share(device: torch.device) -> float:
    return MAX_PAD_SHARE if device.type == "cpu" else math.inf


def resolve_artifact(path_or_id: str | os.PathLike | None, cache_dir: str | None = None) -> Path:
    """A local artifact directory: the embedded default, a directory, or a hub download."""
    if path_or_id is None:
        return DEFAULT_ARTIFACT
    if os.path.isdir(path_or_id):
        return Path(path_or_id)
    if os.path.exists(path_or_id) or str(path_or_id).startswith((".", "/", "~")):
        raise ArtifactError(f"artifact directory {str(path_or_id)!r} does not exist or is not a directory")
    from huggingface_hub import hf_hub_download  # for users who have a hub; never in tests

    try:
        config = hf_hub_download(repo_id=str(path_or_id), filename="siren_config.json", cache_dir=cache_dir)
        hf_hub_download(repo_id=str(path_or_id), filename="siren.safetensors", cache_dir=cache_dir)
    except (OSError, ValueError) as exc:  # the hub's errors: offline, not found, not a repo id
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"artifact {str(path_or_id)!r} is not a local directory, and the hub "
                            f"cannot give it: {first}") from exc
    return Path(config).parent


def backbone_spec(config: ArtifactConfig, artifact_dir: Path) -> str:
    """`base_model.source` (relative paths resolve against the artifact) or `model_id`."""
    source = config.source
    if source is None:
        return config.base_model_id
    if not source.startswith("pypi:") and not os.path.isabs(source) and (artifact_dir / source).exists():
        return str(artifact_dir / source)
    return source


class SirenGuard:
    def __init__(
        self, config: ArtifactConfig, head: SirenHead, backbone: Backbone, *, long_text: str = "window",
        static_steps: bool | None = None, stream_slots: int = 64, compile_steps: bool | str = False,
        packed_steps: bool | None = None, prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
        emoji: str = "read",
    ) -> None:
        if emoji not in EMOJI_RULES:
            raise ValueError(f"emoji must be one of {', '.join(EMOJI_RULES)}, got {emoji!r}")
        self.emoji = emoji
        self._config = config
        self._backbone = backbone
        self.lock = threading.RLock()  # held by every call that runs the backbone (module docstring)
        self._tokenizer = backbone.tokenizer
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._tokenizer.padding_side = "right"  # the reference pads right; the mask ignores pads
        self._readout = Readout(backbone.model, config)
        self._closed = False
        self._head = head.to(self._readout.device).eval()
        self._plan = TokenPlan.for_tokenizer(self._tokenizer, config.max_length, long_text)
        if stream_slots < 1:
            raise ValueError(f"stream_slots must be at least 1, got {stream_slots}")
        self._static_steps = static_steps
        self._stream_slots = stream_slots
        self._compile_steps = compile_steps
        self._stepper = None
        self._stepper_checked = False
        if static_steps:
            self._check_static_steps()
        self._packer = None
        if packed_steps is not False:
            from guard.graphs import unsupported_reason
            from guard.packing import PackedStep

            reason = unsupported_reason(self._readout.model, self.max_length)
            if reason is None:
                self._packer = PackedStep(self._readout)
            elif packed_steps:
                raise BackboneError(f"packed_steps=True, but this backbone cannot take packed steps: {reason}")
        if not 0 <= prefix_cache_mb < math.inf:  # NaN fails this too
            raise ValueError(f"prefix_cache_mb must be a finite number at least 0, got {prefix_cache_mb}")
        self._prefixes = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        cache_dir: str | None = None,
        *,
        trust_remote_code: bool = False,
        long_text: str = "window",
        backbone: str | None = None,
        static_steps: bool | None = None,
        stream_slots: int = 64,
        compile_steps: bool | str = False,
        packed_steps: bool | None = None,
        prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
        emoji: str = "read",
    ) -> SirenGuard:
        """Load an artifact (default: the embedded one) and its backbone, offline if local.

        `backbone` overrides where the backbone is loaded from (a directory, a `.gguf`,
        `pypi:<package>` or a hub id): the head is only valid on the backbone it was fitted
        on, so this is for a local copy of that same model.

        `static_steps` (`guard.graphs`): streaming sessions step over fixed shapes,
        captured as CUDA graphs. None (default): on CUDA when the backbone supports it;
        True: also on CPU, where the steps run without capture (for tests), and an
        unsupported backbone is an error; False: off. `stream_slots` windows at a time
        take static steps; more fall back to the eager path. `compile_steps` fuses each
        static step with torch.compile (True: inductor; or a backend name) before
        capture; call `warm_up()` to pay for it at load. `packed_steps` (`guard.packing`):
        streaming windows outside static slots step through one packed forward, several
        sessions' new tokens at once (`guard.session.append_all`); None (default): when
        the backbone supports it; False: one transformers forward per window.
        `prefix_cache_mb` (`guard.prefixes`): streaming sessions that start with a token
        prefix an earlier session ran continue from its state instead of running it
        again (exact); the cache holds at most this many MiB, 0 turns it off.
        `emoji`: "read" (default) scores a text as written, as the reference does; "max"
        reads it as a person does, without the invisible characters that join nothing
        and with lookalike letters folded to Latin ones (`guard.text.visible_reading`,
        `guard.lookalikes`), and a text with emoji or leetspeak also without its emoji and
        with leetspeak read as letters (`guard.text.second_reading`), keeping the higher
        score, in `score`,
        `score_batch` and streaming sessions alike (README, "Emoji").
        """
        folder = resolve_artifact(path_or_id, cache_dir)
        config, state_dict = read_artifact(folder)
        head = load_head(config, state_dict)
        spec = backbone or backbone_spec(config, folder)
        loaded = load_backbone(
            spec, revision=config.revision, dtype=dtype, device=device,
            cache_dir=cache_dir, trust_remote_code=trust_remote_code,
        )
        logger.info("SIREN artifact %s on backbone %s (%s, %s)", folder, loaded.source,
                    next(loaded.model.parameters()).dtype, next(loaded.model.parameters()).device)
        return cls(config, head, loaded, long_text=long_text, static_steps=static_steps,
                   stream_slots=stream_slots, compile_steps=compile_steps, packed_steps=packed_steps,
                   prefix_cache_mb=prefix_cache_mb, emoji=emoji)

    # -- properties mirrored from the reference ------------------------------------------
    @property
    def config(self) -> ArtifactConfig:
        return self._config

    @property
    def default_threshold(self) -> float:
        return self._config.default_threshold

    @property
    def base_model_id(self) -> str:
        return self._config.base_model_id

    @property
    def device(self) -> torch.device:
        return self._readout.device

    @property
    def dtype(self) -> torch.dtype:
        return self._readout.dtype

    @property
    def max_length(self) -> int:
        return self._config.max_length

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def plan(self) -> TokenPlan:
        return self._plan

    @property
    def readout(self) -> Readout:
        return self._readout

    @property
    def head(self) -> SirenHead:
        return self._head

    @property
    def stepper(self):
        """The `StaticStepper` streaming windows use, made on first use; None when off."""
        if not self._stepper_checked:
            self._stepper_checked = True
            on = self._static_steps if self._static_steps is not None else self.device.type == "cuda"
            if on and self._check_static_steps() is None:
                from guard.graphs import StaticStepper

                self._stepper = StaticStepper(self._readout, self._head, self.max_length,
                                              slots=self._stream_slots, compile=self._compile_steps)
        return self._stepper

    @property
    def prefixes(self) -> PrefixCache | None:
        """Scored prefixes streaming sessions start from (`guard.prefixes`); None when off."""
        return self._prefixes

    @property
    def packer(self):
        """The `PackedStep` streaming windows use outside static slots; None when off."""
        return self._packer

    @torch.no_grad()
    def feed_rows(self, feeds: Sequence[tuple[object, list[int]]]) -> list[torch.Tensor]:
        """Feed each `ids` after its `DynamicCache`'s prefix; each feed's float32 rows of
        selected neurons, (len(ids), n_features). Packed into forwards of at most
        `MAX_BATCH_TOKENS` new tokens where the backbone allows, else one forward each."""
        with self.lock:
            if self._packer is None:
                return [self._readout.rows(torch.as_tensor([ids], dtype=torch.long, device=self.device), None, cache)[0]
                        for cache, ids in feeds]
            out: list[torch.Tensor] = []
            for lo, hi in _token_chunks([len(ids) for _, ids in feeds]):
                out.extend(self._packer.rows(feeds[lo:hi]))
            return out

    def warm_up(self) -> float:
        """Capture (and compile) the static steps now; seconds taken (0 without them)."""
        if self.stepper is None:
            return 0.0
        start = time.perf_counter()
        self.stepper.warm_up()
        return time.perf_counter() - start

    def _check_static_steps(self) -> str | None:
        from guard.graphs import unsupported_reason

        reason = unsupported_reason(self._readout.model, self.max_length)
        if reason is not None and self._static_steps:
            raise BackboneError(f"static_steps=True, but this backbone cannot take static steps: {reason}")
        if reason is not None and self._static_steps is None:
            logger.info("streaming sessions use eager steps: %s", reason)
        return reason

    def threshold(self, threshold: float | None) -> float:
        """`threshold`, or the artifact's default when None. A threshold outside [0, 1]
        (or NaN, or not a number) is a `ValueError`: no score could cross it, or every
        score would, and the reference would take it silently."""
        if threshold is None:
            return self._config.default_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not 0.0 <= threshold <= 1.0:  # (NaN fails this too)
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        return float(threshold)

    # -- scoring -------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self, text: str | None = None, *, prompt: str | None = None, response: str | None = None,
        threshold: float | None = None,
    ) -> ScoreResult:
        prepared = model_text(text, prompt=prompt, response=response)
        return ScoreResult.of(self.p_harmful([prepared])[0], self.threshold(threshold))

    def __call__(self, *args, **kwargs) -> ScoreResult:
        return self.score(*args, **kwargs)

    @torch.no_grad()
    def score_batch(self, texts: Sequence[str], threshold: float | None = None) -> list[ScoreResult]:
        thr = self.threshold(threshold)
        scores = self.p_harmful([model_text(t or "") for t in texts])
        return [ScoreResult.of(p, thr) for p in scores]

    @torch.no_grad()
    def score_streaming(self, response_so_far: str, threshold: float | None = None) -> ScoreResult:
        """The reference's stateless check of a response alone; see `stream` for sessions."""
        return self.score_batch([response_so_far], threshold)[0]

    def stream(self, prompt: str | None = None, *, threshold: float | None = None, prefill: bool = True,
               cache_salt: str | None = None):
        """An exact incremental session over `prompt + "\\n" + response_so_far`. The prompt
        is prefilled now, or with `prefill=False` at the first `append` (which is how a
        worker packs a new session's prefill with other sessions' checks). `cache_salt`:
        the session continues from, and leaves its prompt in, only the prefix cache
        entries of sessions with the same salt (`guard.prefixes`)."""
        from guard.session import StreamSession

        self._open()
        return StreamSession(self, prompt=prompt, threshold=self.threshold(threshold), prefill=prefill,
                             cache_salt=cache_salt)

    @torch.no_grad()
    def p_harmful(self, prepared: Sequence[str], given_up: Callable[[], bool] | None = None) -> list[float]:
        """P(harmful) of texts already prepared by `guard.text.model_text`; a text's score
        is its windows' maximum, NaN if any window's is (`guard.windows.text_score`).
        `given_up()` true between forwards raises `Abandoned` (the worker's callers all
        left: a long text is not read to its end for nobody).

        On CPU, where the backbone takes packed steps (`guard.packing`), every window's
        tokens are packed into forwards of at most `MAX_BATCH_TOKENS`, no padding, each
        window pooled as a session pools it. Otherwise (a GPU, where padding is nearly
        free and one wide forward is best; other backbones) every window is one row of a
        right-padded batch; windows are sorted by length and cut into forwards whose
        padding stays under `MAX_PAD_SHARE` of their tokens on CPU (and under
        `MAX_BATCH_TOKENS` in all).
        """
        self._open()
        with self.lock:
            if self.emoji == "read":
                return self._p_harmful(prepared, given_up)
            first = [visible_reading(text) or text for text in prepared]
            second = [second_reading(text) for text in first]  # one batch with the first readings
            scores = self._p_harmful([*first, *(text for text in second if text is not None)], given_up)
            others = iter(scores[len(first):])
            return [score if text is None else text_score([score, next(others)])
                    for score, text in zip(scores, second)]

    def _p_harmful(self, prepared: Sequence[str], given_up: Callable[[], bool] | None) -> list[float]:
        if not prepared:
            return []
        windows: list[tuple[int, list[int]]] = []
        prefix = list(self._plan.prefix)
        for i, body in enumerate(self._plan.bodies(self._tokenizer, prepared)):
            for start, end in self._plan.spans(len(body)):
                windows.append((i, prefix + body[start:end]))
        scores: list[list[float]] = [[] for _ in prepared]  # per text, its windows'
        if self._packer is not None and self.device.type == "cpu":
            config = self._readout.model.config
            for lo, hi in _token_chunks([len(ids) for _, ids in windows]):
                _check(given_up)
                chunk = windows[lo:hi]
                rows = self._packer.rows([(DynamicCache(config=config), ids) for _, ids in chunk])
                pooled = torch.cat([r.sum(dim=0, keepdim=True) / len(r) for r in rows]) * self._readout.weights
                for (i, _), p in zip(chunk, self._head.p_harmful(pooled).tolist()):
                    scores[i].append(p)
            return [text_score(s) for s in scores]
        windows.sort(key=lambda w: len(w[1]))
        pad = self._tokenizer.pad_token_id
        pad_share = max_pad_share(self.device)
        lo = 0
        while lo < len(windows):
            _check(given_up)
            hi, real = lo + 1, len(windows[lo][1])
            while hi < len(windows):
                padded = len(windows[hi][1]) * (hi + 1 - lo)  # sorted: the new one is the widest
                if padded > MAX_BATCH_TOKENS or padded > (1 + pad_share) * (real + len(windows[hi][1])):
                    break
                real += len(windows[hi][1])
                hi += 1
            chunk = windows[lo:hi]
            width = len(chunk[-1][1])
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (batch, seq)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (batch, seq)
            for row, (_, toks) in enumerate(chunk):
                ids[row, : len(toks)] = torch.as_tensor(toks)
                mask[row, : len(toks)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            feats = self._readout.pool(self._readout.rows(ids, mask), mask)  # (batch, F)
            for (i, _), p in zip(chunk, self._head.p_harmful(feats).tolist()):
                scores[i].append(p)
            lo = hi
        return [text_score(s) for s in scores]

    def close(self) -> None:
        """Remove the readout's hooks from the backbone: the guard scores no more, nor
        open sessions where they read through the hooks (`WorkerClosed`)."""
        self._closed = True
        self._readout.close()

    def _open(self) -> None:
        if self._closed:
            raise WorkerClosed("this guard is closed")


def _check(given_up: Callable[[], bool] | None) -> None:
    if given_up is not None and given_up():
        raise Abandoned("every caller of this scoring gave up")


def _token_chunks(lengths: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Consecutive (lo, hi) ranges of feeds whose tokens add up to at most
    `MAX_BATCH_TOKENS` (a longer feed alone): one packed forward each."""
    lo = 0
    while lo < len(lengths):
        hi, tokens = lo + 1, lengths[lo]
        while hi < len(lengths) and tokens + lengths[hi] <= MAX_BATCH_TOKENS:
            tokens += lengths[hi]
            hi += 1
        yield lo, hi
        lo = hi


__all__ = ["SirenGuard", "ScoreResult", "DEFAULT_ARTIFACT"]
