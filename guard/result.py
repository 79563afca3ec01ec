"""The value every scoring call returns (the reference's `ScoreResult`, frozen)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ScoreResult:
    score: float  # P(harmful), in [0, 1]
    is_harmful: bool  # score >= threshold
    threshold: float

    @classmethod
    def of(cls, score: float, threshold: float) -> ScoreResult:
        return cls(score=float(score), is_harmful=float(score) >= threshold, threshold=threshold)

    def to_dict(self) -> dict:
        return asdict(self)
