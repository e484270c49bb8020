"""The platform's only use of whylogs: profile frames, merge, store, and read sketches back.

Keeping whylogs behind this module means it can be replaced (it pins numpy<2) without
touching the assets or the drift measures, which see numpy arrays and dicts only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def profile(frame: pd.DataFrame):
    """A whylogs profile view of a frame (an empty view for an empty frame)."""
    import whylogs as why

    return why.log(frame).view()


def merge(views: list):
    """One profile of several (whylogs profiles merge exactly for counts, approximately for
    sketches); None for none."""
    merged = None
    for view in views:
        merged = view if merged is None else merged.merge(view)
    return merged


def save(view, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(view.serialize())
    tmp.replace(path)
    return path


def load(path: Path):
    from whylogs.core import DatasetProfileView

    return DatasetProfileView.deserialize(Path(path).read_bytes())


def _column(view, name: str):
    column = view.get_column(name)
    if column is None:
        raise KeyError(f"column {name!r} is not in the profile")
    return column


def row_count(view, name: str) -> int:
    return int(_column(view, name).get_metric("counts").n.value)


def null_count(view, name: str) -> int:
    return int(_column(view, name).get_metric("counts").null.value)


def quantiles(view, name: str, qs) -> np.ndarray:
    """Quantiles of a numeric column from its KLL sketch (empty array when no numbers)."""
    sketch = _column(view, name).get_metric("distribution").kll.value
    if sketch.is_empty():
        return np.array([])
    return np.asarray(sketch.get_quantiles(list(qs)), dtype=float)


def pmf(view, name: str, split_points) -> np.ndarray:
    """Probability mass of a numeric column in the bins cut at ``split_points`` (len + 1 bins)."""
    sketch = _column(view, name).get_metric("distribution").kll.value
    if sketch.is_empty():
        return np.full(len(split_points) + 1, np.nan)
    return np.asarray(sketch.get_pmf(list(split_points)), dtype=float)


def frequencies(view, name: str) -> dict[str, float]:
    """Estimated counts of the frequent values of a (categorical) column."""
    metric = _column(view, name).get_metric("frequent_items")
    if metric is None:
        return {}
    return {item.value: float(item.est) for item in metric.to_summary_dict()["frequent_strings"]}


def summary(view) -> pd.DataFrame:
    """Per column: rows, nulls, mean, stddev, min, quartiles, max (numbers only where numeric)."""
    frame = view.to_pandas()
    wanted = {
        "counts/n": "rows", "counts/null": "nulls", "distribution/mean": "mean", "distribution/stddev": "stddev",
        "distribution/min": "min", "distribution/q_25": "q25", "distribution/median": "median",
        "distribution/q_75": "q75", "distribution/max": "max",
    }
    present = [c for c in wanted if c in frame.columns]
    out = frame[present].rename(columns=wanted).rename_axis("feature").reset_index()
    for column in wanted.values():
        if column not in out.columns:
            out[column] = np.nan
    return out[["feature", *wanted.values()]]
