"""The platform's only use of whylogs: profile frames, merge, store, and read sketches back.

Keeping whylogs behind this module means it can be replaced (it pins numpy<2) without
touching the assets or the drift measures, which see numpy arrays and dicts only.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd



def profile(frame: pd.DataFrame):
    """A whylogs profile view of a frame: per column counts, nulls and types, a KLL sketch of
    numbers, frequent items of text (what the drift measures and summaries read).

    Two things make this ~15x faster than ``why.log(frame)`` (measured in benchmarks/):
    - ``why.log`` inspects every value in Python to sort it into null/int/float/string/inf.
      Here pandas does that: each column's non-null values go to whylogs as one homogeneous
      series (whylogs' ``ColumnProperties.homogeneous`` fast path) and its nulls through the
      ordinary path in a second profile, merged into the first. Same counts (test_drift).
    - ``_Resolver`` skips the metrics nothing reads (cardinality sketches, a KLL sketch of text),
      which were most of the cost of a profile of one day's ~900 rows."""
    import pandas as pd
    from whylogs.core import DatasetProfile, DatasetSchema
    from whylogs.core.preprocessing import ColumnProperties

    kinds = {name: (dtype.type if pd.api.types.is_numeric_dtype(dtype) else str) for name, dtype in frame.dtypes.items()}
    missing = frame.isna()
    null_counts = missing.sum()
    complete = [name for name in frame.columns if null_counts[name] == 0]
    with_nulls = [name for name in frame.columns if null_counts[name] > 0]
    values = DatasetProfile(DatasetSchema(
        types={name: (kinds[name], ColumnProperties.homogeneous) for name in frame.columns}, resolvers=_resolver()
    ))
    nulls = DatasetProfile(DatasetSchema(types={name: kinds[name] for name in with_nulls}, resolvers=_resolver()))
    if complete and len(frame):
        values.track(pandas=frame[complete].reset_index(drop=True))  # one call for every column without nulls
    for name in with_nulls:
        column, mask = frame[name].to_numpy(), missing[name].to_numpy()
        if not mask.all():
            values.track(pandas=pd.DataFrame({name: column[~mask]}))
        nulls.track(pandas=pd.DataFrame({name: column[mask]}))
    return values.view().merge(nulls.view()) if with_nulls else values.view()


@functools.cache
def _resolver():
    from whylogs.core.datatypes import Fractional, Integral, String
    from whylogs.core.metrics import StandardMetric
    from whylogs.core.resolvers import Resolver

    class _Resolver(Resolver):
        """Counts and types of every column; a KLL sketch of numbers; frequent items of text."""

        def resolve(self, name, why_type, column_schema):
            metrics = [StandardMetric.counts, StandardMetric.types]
            if isinstance(why_type, (Integral, Fractional)):
                metrics.append(StandardMetric.distribution)
            elif isinstance(why_type, String):
                metrics.append(StandardMetric.frequent_items)
            return {m.name: m.zero(column_schema.cfg) for m in metrics}

    return _Resolver()


def merge(views: list):
    """One profile of several (whylogs profiles merge exactly for counts, approximately for
    sketches); None for none."""
    merged = None
    for view in views:
        merged = view if merged is None else merged.merge(view)
    return merged


# Profiles this process saved or loaded, by path, with the file's (mtime, size) then: reading a
# whylogs profile back costs ~20-40 ms, and a monitoring run that profiles a year of days then
# compares each with the reference would otherwise read back the 365 profiles it has just written.
# A file changed since (by anyone) no longer matches and is read again.
_VIEWS: dict[Path, tuple[tuple[int, int], object]] = {}
_VIEWS_MAX = 2_000


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def _remember(path: Path, view) -> None:
    if len(_VIEWS) >= _VIEWS_MAX:
        _VIEWS.pop(next(iter(_VIEWS)))
    _VIEWS[path] = (_stamp(path), view)


def save(view, path: Path) -> Path:
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(view.serialize())
    tmp.replace(path)
    _remember(path, view)
    return path


def load(path: Path):
    from whylogs.core import DatasetProfileView

    path = Path(path).resolve()
    known = _VIEWS.get(path)
    if known is not None and known[0] == _stamp(path):
        return known[1]
    view = DatasetProfileView.deserialize(path.read_bytes())
    _remember(path, view)
    return view


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
    import numpy as np

    sketch = _column(view, name).get_metric("distribution").kll.value
    if sketch.is_empty():
        return np.array([])
    return np.asarray(sketch.get_quantiles(list(qs)), dtype=float)


def pmf(view, name: str, split_points) -> np.ndarray:
    """Probability mass of a numeric column in the bins cut at ``split_points`` (len + 1 bins)."""
    import numpy as np

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
    import numpy as np

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
