"""Is one model better than another on the same flights? DeLong's test of two correlated ROC AUCs.

Two versions scored the same labelled flights (the champion and a canary, or a shadow): their
AUCs are correlated, so comparing two confidence intervals would be wrong. DeLong, DeLong and
Clarke-Pearson (1988, Biometrics 44:837) estimate the covariance of the two AUCs from each
flight's placement values (the share of the other class it outranks); the difference over its
standard error is asymptotically normal. Computed with midranks (Sun and Xu 2014, IEEE Signal
Processing Letters 21:1389): O(n log n), ties counted one half, as in the AUC itself.

``mlplatform_tests/test_rollout.py`` checks it against the O(positives x negatives) definition,
scikit-learn's AUC, the false-positive rate under the null, and SciPy's paired bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AucComparison:
    auc_a: float
    auc_b: float
    difference: float   # auc_b - auc_a
    std_error: float    # of the difference
    z: float
    p_value: float      # two-sided
    positives: int
    negatives: int

    def better(self, level: float) -> bool:
        """B is better than A at significance ``level``."""
        return self.difference > 0 and self.p_value < level

    def worse(self, level: float) -> bool:
        """B is worse than A at significance ``level``."""
        return self.difference < 0 and self.p_value < level


def placements(labels: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUC, the positives' placement values, the negatives' placement values): a positive's is
    the share of negatives it outscores, a negative's the share of positives that outscore it
    (ties one half). The AUC is the mean of either."""
    from scipy.stats import rankdata

    positive, negative = scores[labels == 1], scores[labels == 0]
    m, n = len(positive), len(negative)
    both = rankdata(np.concatenate([positive, negative]))  # midranks
    among_positives, among_negatives = rankdata(positive), rankdata(negative)
    v_positive = (both[:m] - among_positives) / n
    v_negative = 1.0 - (both[m:] - among_negatives) / m
    return float(v_positive.mean()), v_positive, v_negative


def delong(labels, scores_a, scores_b) -> AucComparison:
    """DeLong's test of ROC AUC(B) = ROC AUC(A), both scored on the same flights (see the module)."""
    from scipy.stats import norm

    labels = np.asarray(labels, dtype=float)
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if not (len(labels) == len(a) == len(b)):
        raise ValueError(f"labels and scores differ in length: {len(labels)}, {len(a)}, {len(b)}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (a flight without its label has no place in the comparison)")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores must be finite numbers")
    labels = labels.astype(int)
    m, n = int((labels == 1).sum()), int((labels == 0).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least two flights of each class: {m} delayed, {n} not")
    auc_a, pos_a, neg_a = placements(labels, a)
    auc_b, pos_b, neg_b = placements(labels, b)
    covariance = np.cov(np.vstack([pos_a, pos_b])) / m + np.cov(np.vstack([neg_a, neg_b])) / n
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    difference = auc_b - auc_a
    if variance <= 0:  # no spread of the placements: identical rankings, or perfect ones
        return AucComparison(auc_a, auc_b, difference, 0.0, 0.0, 1.0 if difference == 0 else 0.0, m, n)
    std_error = float(np.sqrt(variance))
    z = difference / std_error
    return AucComparison(auc_a, auc_b, difference, std_error, float(z), float(2 * norm.sf(abs(z))), m, n)
