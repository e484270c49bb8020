"""Drift of a day's profile against a reference profile, per feature. Plain functions.

Measures are effect sizes on binned distributions, so they do not flag everything on large
samples the way a test's p-value does:

* PSI (population stability index) = symmetric KL divergence of the binned distributions,
  computed with ``scipy.special.rel_entr``. Bins: the reference's deciles (numeric) or its
  frequent values plus "other" (categorical). A feature drifts when PSI > ``psi_threshold``
  (0.25 by default; 0.1-0.25 is usually read as moderate).
* Jensen-Shannon distance (base 2, in [0, 1]) from ``scipy.spatial.distance.jensenshannon``,
  reported beside PSI with its own threshold.
* KS statistic: the largest gap between the two CDFs at the reference's percentiles, from the
  KLL sketches (numeric only, reported, not used to flag).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlplatform.monitoring import profiles

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

EPSILON = 1e-4  # floor for empty bins, so PSI stays finite


@dataclass(frozen=True)
class Thresholds:
    psi: float = 0.25
    js: float = 0.2
    drifted_share: float = 0.3   # the day's check fails when more features drift than this


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    import numpy as np
    from scipy.special import rel_entr

    p = np.clip(np.asarray(expected, float), EPSILON, None)
    q = np.clip(np.asarray(actual, float), EPSILON, None)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(rel_entr(q, p) + rel_entr(p, q)))


def js_distance(expected: np.ndarray, actual: np.ndarray) -> float:
    import numpy as np
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(np.asarray(expected, float), np.asarray(actual, float), base=2))


def numeric_bins(reference, current, column: str, bins: int = 10) -> tuple[np.ndarray, np.ndarray] | None:
    import numpy as np

    ref = Reference.of(reference)

    def reference_bins():
        cuts = np.unique(profiles.quantiles(ref.view, column, np.linspace(0, 1, bins + 1)[1:-1]))
        return cuts, (profiles.pmf(ref.view, column, cuts) if cuts.size else None)

    cuts, expected = ref.cached(("deciles", column, bins), reference_bins)
    if cuts.size == 0:
        return None
    actual = profiles.pmf(current, column, cuts)
    if np.isnan(actual).any():
        return None
    return expected, actual


def categorical_bins(reference, current, column: str) -> tuple[np.ndarray, np.ndarray] | None:
    import numpy as np

    reference = Reference.of(reference)
    ref = reference.cached(("frequencies", column), lambda: profiles.frequencies(reference.view, column))
    cur = profiles.frequencies(current, column)
    if not ref or not cur:
        return None
    ref_n = reference.cached(("rows", column), lambda: profiles.row_count(reference.view, column))
    cur_n = profiles.row_count(current, column)
    values = sorted(ref)
    expected = np.array([ref[v] for v in values] + [max(ref_n - sum(ref.values()), 0)], float)
    actual = np.array([cur.get(v, 0.0) for v in values] + [max(cur_n - sum(cur.get(v, 0.0) for v in values), 0)], float)
    return expected / expected.sum(), actual / max(actual.sum(), 1.0)


def _has_values(view, column: str) -> bool:
    try:
        return profiles.row_count(view, column) > profiles.null_count(view, column)
    except KeyError:
        return False


def ks_statistic(reference, current, column: str) -> float | None:
    import numpy as np

    ref = Reference.of(reference)

    def reference_cdf():
        cuts = np.unique(profiles.quantiles(ref.view, column, np.linspace(0.01, 0.99, 99)))
        return cuts, (np.cumsum(profiles.pmf(ref.view, column, cuts))[:-1] if cuts.size else None)

    cuts, ref_cdf = ref.cached(("percentiles", column), reference_cdf)
    if cuts.size == 0:
        return None
    cur = profiles.pmf(current, column, cuts)
    if np.isnan(cur).any():
        return None
    return float(np.max(np.abs(ref_cdf - np.cumsum(cur)[:-1])))


class Reference:
    """A reference profile with what ``compare`` reads of it computed once, for every day it is
    compared with (a year's drift report compares 365 days with one reference)."""

    def __init__(self, view):
        self.view = view
        self._cache: dict = {}

    @classmethod
    def of(cls, reference) -> "Reference":
        """``reference`` itself, or a profile view wrapped for one comparison."""
        return reference if isinstance(reference, cls) else cls(reference)

    def cached(self, key, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


def compare(reference, current, numeric: list[str], categorical: list[str], thresholds: Thresholds) -> pd.DataFrame:
    """One row per feature and measure: feature, metric, value, threshold, drifted. ``reference``
    is a profile view, or a ``Reference`` of one to compare many days with."""
    import numpy as np
    import pandas as pd

    reference = Reference.of(reference)
    rows = []
    for column in [*numeric, *categorical]:
        binned = numeric_bins(reference, current, column) if column in numeric else categorical_bins(
            reference, current, column
        )
        if binned is None:
            if _has_values(reference.view, column) and not _has_values(current, column):
                # the feature vanished (all null): the largest drift there is, not a missing row
                rows.append((column, "psi", float("inf"), thresholds.psi))
            continue
        expected, actual = binned
        rows.append((column, "psi", psi(expected, actual), thresholds.psi))
        rows.append((column, "js_distance", js_distance(expected, actual), thresholds.js))
        if column in numeric:
            ks = ks_statistic(reference, current, column)
            if ks is not None:
                rows.append((column, "ks_statistic", ks, None))
    frame = pd.DataFrame(rows, columns=["feature", "metric", "value", "threshold"])
    frame["drifted"] = frame["threshold"].notna() & (frame["value"] > frame["threshold"].fillna(np.inf))
    return frame


def _judged(report: pd.DataFrame) -> pd.DataFrame:
    psi_rows = report[report["metric"] == "psi"]
    return psi_rows[psi_rows["judged"]] if "judged" in psi_rows else psi_rows


def drifted_features(report: pd.DataFrame) -> list[str]:
    """Judged features whose PSI passes its threshold (PSI decides; the other measures inform)."""
    flagged = _judged(report)
    flagged = flagged[flagged["drifted"]]
    return flagged.sort_values("value", ascending=False)["feature"].tolist()


def judged_features(report: pd.DataFrame) -> int:
    """How many features the day's verdict is made of (judged, with a PSI)."""
    return int(_judged(report)["feature"].nunique())


def drifted_share(report: pd.DataFrame) -> float:
    features = judged_features(report)
    return len(drifted_features(report)) / features if features else 0.0
