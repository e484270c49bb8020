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
    numbers, frequent items of text (what the drift measures and summaries read)."""
    return profile_groups(frame, None)[0][1]


def profile_groups(frame: pd.DataFrame, labels) -> list[tuple[object, object]]:
    """One whylogs profile view per group of rows, ``[(label, view), ...]`` in label order;
    ``labels`` gives each row's group (a day, say), None makes the whole frame one group.

    The views are whylogs' own objects, built from numpy instead of through ``why.log``, which is
    ~15x slower here: it sorts every value into null/int/float/string in Python, and makes
    metrics nothing reads (cardinality sketches, a KLL sketch of text). Each column is turned into
    numpy once, and each group is a slice of it: what is left per group is whylogs' per-column
    objects and the sketches' C++ (``test_drift`` checks the counts, moments, extremes and frequent
    items against ``why.log``).

    Numbers (ints, floats): counts (NaN is null and nan; inf is counted), types, KLL sketch,
    mean and M2. Text: counts, types, frequent items. Other dtypes are refused."""
    import numpy as np
    import pandas as pd

    n = len(frame)
    if labels is None:
        keys, bounds = [None], [0, n]
        order = None
    else:
        labels = np.asarray(labels)
        order = None if n < 2 or (labels[1:] >= labels[:-1]).all() else np.argsort(labels, kind="stable")
        if order is not None:
            labels = labels[order]
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]]) if n else np.array([], dtype=int)
        keys, bounds = [labels[i] for i in starts], [*starts.tolist(), n]
    columns = {}
    for name, series in frame.items():
        dtype = series.dtype
        if pd.api.types.is_bool_dtype(dtype) or not (
            pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_object_dtype(dtype)
            or pd.api.types.is_string_dtype(dtype)
        ):
            raise TypeError(f"profile: column {name!r} has dtype {dtype}; numbers and text are profiled")
        if pd.api.types.is_numeric_dtype(dtype):
            values = series.to_numpy(dtype="float64", na_value=np.nan)
            kind, missing = ("int" if pd.api.types.is_integer_dtype(dtype) else "float"), np.isnan(values)
        else:
            values = series.to_numpy(dtype=object)
            kind, missing = "text", pd.isna(values)
        if order is not None:
            values, missing = values[order], missing[order]
        columns[name] = (kind, values, missing)
    build = _builder()
    return [
        (key, build({name: (kind, v[a:b], m[a:b]) for name, (kind, v, m) in columns.items()}, b - a))
        for key, a, b in zip(keys, bounds[:-1], bounds[1:])
    ]


@functools.cache
def _builder():
    """A function of {column: (kind, values, null mask)} and the row count to a profile view."""
    import datetime as dt

    import numpy as np
    import whylogs_sketching as ds
    from whylogs.core import DatasetProfileView
    from whylogs.core.metrics import ColumnCountsMetric, DistributionMetric, FrequentItemsMetric, MetricConfig
    from whylogs.core.metrics import TypeCountersMetric
    from whylogs.core.metrics.metric_components import (
        FractionalComponent,
        FrequentStringsComponent,
        IntegralComponent,
        KllComponent,
    )
    from whylogs.core.view import ColumnProfileView

    config = MetricConfig()
    kll_k = config.kll_k_large if config.large_kll_k else config.kll_k
    longest = config.max_frequent_item_size

    def types(integral=0, fractional=0, string=0, other=0):
        return TypeCountersMetric(
            integral=IntegralComponent(integral), fractional=IntegralComponent(fractional),
            boolean=IntegralComponent(0), string=IntegralComponent(string), object=IntegralComponent(other),
        )

    def counts(rows, nulls, nan=0, inf=0):
        return ColumnCountsMetric(
            n=IntegralComponent(rows), null=IntegralComponent(nulls), nan=IntegralComponent(nan),
            inf=IntegralComponent(inf),
        )

    def number(kind, values, missing, rows):
        present = values[~missing]
        sketch = ds.kll_doubles_sketch(k=kll_k)
        mean = m2 = 0.0
        if len(present):
            sketch.update(present)
            mean = float(present.mean())
            m2 = float(((present - mean) ** 2).sum()) if len(present) > 1 else 0.0
        nulls = int(missing.sum())
        return ColumnProfileView(metrics={
            "counts": counts(rows, nulls, nan=nulls, inf=int(np.isinf(present).sum())),
            "types": types(**{("integral" if kind == "int" else "fractional"): len(present)}),
            "distribution": DistributionMetric(
                kll=KllComponent(sketch), mean=FractionalComponent(mean), m2=FractionalComponent(m2)
            ),
        })

    def text(values, missing, rows):
        present = values[~missing]
        strings = [v[:longest] for v in present if isinstance(v, str)]
        sketch = ds.frequent_strings_sketch(lg_max_k=config.fi_lg_max_k)
        if strings:
            sketch.update_str_list(strings)
        return ColumnProfileView(metrics={
            "counts": counts(rows, int(missing.sum())),
            "types": types(string=len(strings), other=len(present) - len(strings)),
            "frequent_items": FrequentItemsMetric(
                frequent_strings=FrequentStringsComponent(sketch), max_frequent_item_size=longest
            ),
        })

    def build(columns, rows):
        now = dt.datetime.now(dt.timezone.utc)
        return DatasetProfileView(
            columns={
                name: (text(values, missing, rows) if kind == "text" else number(kind, values, missing, rows))
                for name, (kind, values, missing) in columns.items()
            },
            dataset_timestamp=now, creation_timestamp=now,
        )

    return build


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
    """Per column: rows, nulls, mean, stddev, min, quartiles, max (numbers only where numeric),
    read from the view's metrics (whylogs' ``to_pandas`` summarises every metric, ~5 ms a view)."""
    import numpy as np
    import pandas as pd

    rows = []
    for name, column in view.get_columns().items():
        counts = column.get_metric("counts")
        stats = [np.nan] * 7
        distribution = column.get_metric("distribution")
        if distribution is not None and not distribution.kll.value.is_empty():
            sketch = distribution.kll.value
            q25, median, q75 = sketch.get_quantiles([0.25, 0.5, 0.75])
            stats = [distribution.avg, distribution.stddev, sketch.get_min_value(), q25, median, q75,
                     sketch.get_max_value()]
        rows.append((name, int(counts.n.value), int(counts.null.value), *stats))
    out = pd.DataFrame(rows, columns=["feature", "rows", "nulls", "mean", "stddev", "min", "q25", "median", "q75", "max"])
    return out.sort_values("feature", ignore_index=True)
