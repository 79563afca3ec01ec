"""The value every scoring call returns (the reference's `ScoreResult`, frozen)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ScoreResult:
    score: float  # P(harmful), in [0, 1]
    is_harmful: bool  # score >= threshold, or a NaN score
    threshold: float

    @classmethod
    def of(cls, score: float, threshold: float) -> ScoreResult:
        """A NaN score is the model failing (`guard.windows.text_score`): harmful, so that
        a caller reading `is_harmful` fails closed on it, as the proxy does (the reference's
        ``score >= threshold`` is false for NaN and passes the text as benign)."""
        return cls(score=float(score), is_harmful=not float(score) < threshold, threshold=threshold)

    def to_dict(self) -> dict:
        return asdict(self)
