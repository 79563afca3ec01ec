"""Platt scaling: P(harmful) = sigmoid(a · margin + b), fitted on the validation split.

The head is trained with balanced class weights, so its raw margin treats the two
classes as equally likely; Platt scaling on validation makes a score of 0.5 mean
"as likely harmful as not, for text distributed like the training mix". The validation
split is re-weighted to balanced classes before fitting, so the calibrated 0.5 does
not move with the mix's harmful share (see the README, "Training and evaluating SIREN heads").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression


@dataclass(frozen=True)
class Platt:
    a: float
    b: float

    def apply(self, margin: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.a * np.asarray(margin, dtype=np.float64) + self.b)))


def fit_platt(margin: np.ndarray, labels: np.ndarray) -> Platt:
    """One-feature logistic regression of the labels on the margin, classes balanced."""
    model = LogisticRegression(C=1e4, class_weight="balanced", max_iter=1000)
    model.fit(np.asarray(margin, dtype=np.float64).reshape(-1, 1), labels)
    return Platt(a=float(model.coef_[0, 0]), b=float(model.intercept_[0]))
