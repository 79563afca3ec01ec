"""The lexical baseline: TF-IDF n-grams + logistic regression on the same training split.

It reads the same strings as the head (`Row.text`), so any gap between the two is the
value of the backbone's internal representations, not of different inputs. It is
calibrated the same way as the head (class-balanced fit, then Platt scaling of its
margin on the validation split), so both are compared at the same default threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion

from guard.training.calibrate import Platt, fit_platt


@dataclass(frozen=True)
class LexicalBaseline:
    vectorizer: FeatureUnion
    model: LogisticRegression
    platt: Platt

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        margin = self.model.decision_function(self.vectorizer.transform(list(texts)))
        return self.platt.apply(margin)


def fit_baseline(train_texts: Sequence[str], y_train: np.ndarray,
                 val_texts: Sequence[str], y_val: np.ndarray, seed: int) -> LexicalBaseline:
    vectorizer = FeatureUnion([
        ("word", TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=50000)),
        ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True,
                                 max_features=100000)),
    ])
    x_train = vectorizer.fit_transform(list(train_texts))
    model = LogisticRegression(C=4.0, class_weight="balanced", max_iter=2000, random_state=seed)
    model.fit(x_train, y_train)
    platt = fit_platt(model.decision_function(vectorizer.transform(list(val_texts))), y_val)
    return LexicalBaseline(vectorizer=vectorizer, model=model, platt=platt)
