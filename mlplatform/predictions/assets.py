"""``predictions.flight_delay``: the champion's delay probability for every flight of a day,
and the same flights scored by the versions in the shadow and the canary (a row per flight and
version, ``stage`` saying which), so that a candidate is judged on whole days when the labels land
(``rollout.assets.online_evaluation``), not only on the flights someone asked the server about.

A range of days is one run; each run replaces its days in one transaction.
"""

import datetime as dt

from dagster import (
    AssetExecutionContext,
    AssetSelection,
    MaterializeResult,
    MetadataValue,
    asset,
)
from dagster_duckdb import DuckDBResource

from mlplatform import keys
from mlplatform.automation import on_new_data
from mlplatform.lineage import upstream_metadata
from mlplatform.monitoring.costs import measured
from mlplatform.partitions import chunks, daily_partitions, single_run, window_of
from mlplatform.rollout import stages
from mlplatform.rollout.stages import CHAMPION
from mlplatform.training import model as m
from mlplatform.training.tracking import MlflowTracking
from mlplatform.warehouse import create_tables, replace_window, table_metadata

PREDICTIONS_DDL = """
CREATE SCHEMA IF NOT EXISTS predictions;
CREATE TABLE IF NOT EXISTS predictions.flight_delay (
    flight_id         VARCHAR NOT NULL,
    flight_date       DATE NOT NULL,
    delay_probability DOUBLE NOT NULL,
    model_version     VARCHAR NOT NULL,
    scored_at         TIMESTAMP NOT NULL,
    stage             VARCHAR NOT NULL DEFAULT 'champion'  -- the version's stage: champion | shadow | canary
);
-- (a warehouse from before the staged rollout)
ALTER TABLE predictions.flight_delay ADD COLUMN IF NOT EXISTS stage VARCHAR DEFAULT 'champion';
"""


def write_predictions(conn, batches, versions: dict[str, str], start: dt.date, end: dt.date) -> tuple[int, float]:
    """Replace the days start..end of predictions.flight_delay in one transaction with
    ``batches``, an iterable of (frame with flight_id and flight_date, {version: probabilities}),
    scored a chunk at a time (``warehouse.replace_window``); ``versions`` is {version: stage}.
    Returns the champion's rows written and the sum of their probabilities."""
    scored_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    total, rows = 0.0, 0

    def frames():
        nonlocal total, rows
        for frame, probabilities in batches:
            for version, probability in probabilities.items():
                if versions[version] == CHAMPION:
                    total, rows = total + float(probability.sum()), rows + len(frame)
                yield frame[["flight_id", "flight_date"]].assign(
                    delay_probability=probability, model_version=str(version), scored_at=scored_at,
                    stage=versions[version])

    create_tables(conn, PREDICTIONS_DDL)
    replace_window(conn, "predictions.flight_delay", "flight_date", start, end, frames())
    return rows, total


def score(conn, estimators: dict, start: dt.date, end: dt.date):
    """(flights, {version: probabilities}) of start..end, a month at a time."""
    for a, b in chunks(start, end):
        frame = m.load_frame(conn, a, b, labelled=False)
        if len(frame):
            yield frame, {version: m.predict(estimator, frame) for version, estimator in estimators.items()}


@asset(
    key=keys.PREDICTIONS,
    group_name="predictions",
    deps=[keys.FEATURES, keys.CHAMPION_MODEL],
    partitions_def=daily_partitions,
    backfill_policy=single_run,
    kinds={"scikit-learn", "duckdb"},
    owners=["team:ml-platform"],
    tags={"daily": ""},
    # new days are scored as their features arrive; a new champion does not re-score history
    automation_condition=on_new_data(ignore=AssetSelection.assets(keys.CHAMPION_MODEL)),
    description="Delay probability of every flight of the day (cancelled ones included) by the champion model, "
    "and by the versions in the shadow and the canary (stage per row).",
    pool=keys.WAREHOUSE_POOL,
)
@measured
def flight_delay_predictions(
    context: AssetExecutionContext, warehouse: DuckDBResource, mlflow: MlflowTracking
) -> MaterializeResult:
    start, end = window_of(context)
    # the version champion_model promoted (its materialization), not whatever the alias says now
    version = str(upstream_metadata(context, keys.CHAMPION_MODEL,
                                    "no champion model yet: materialize the training group first")["model_version"])
    with warehouse.get_connection() as conn:
        # the candidates' stages are the warehouse's rollout history (moves serialized by its lock row)
        candidates = stages.candidates(conn, mlflow.registered_model)
        versions = {version: CHAMPION, **{v: stage for stage, v in candidates.items() if v != version}}
        estimators = {v: mlflow.load_model(v) for v in versions}
        rows, total = write_predictions(conn, score(conn, estimators, start, end), versions, start, end)
        metadata = table_metadata(conn, "predictions", "flight_delay", rows)
    return MaterializeResult(metadata={
        **metadata,
        "model_version": version,
        **{f"{stage}_version": v for stage, v in candidates.items()},
        "mean_delay_probability": MetadataValue.float(total / rows if rows else float("nan")),
    })
