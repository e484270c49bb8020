"""``predictions.flight_delay``: the champion's delay probability for every flight of a day.

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
from mlplatform.partitions import chunks, daily_partitions, single_run, window_of
from mlplatform.training import model as m
from mlplatform.training.tracking import MlflowTracking
from mlplatform.warehouse import replace_window, table_metadata

PREDICTIONS_DDL = """
CREATE SCHEMA IF NOT EXISTS predictions;
CREATE TABLE IF NOT EXISTS predictions.flight_delay (
    flight_id         VARCHAR NOT NULL,
    flight_date       DATE NOT NULL,
    delay_probability DOUBLE NOT NULL,
    model_version     VARCHAR NOT NULL,
    scored_at         TIMESTAMP NOT NULL
);
"""


def write_predictions(conn, batches, version: str, start: dt.date, end: dt.date) -> tuple[int, float]:
    """Replace the days start..end of predictions.flight_delay in one transaction with
    ``batches``, an iterable of (frame with flight_id and flight_date, probabilities), scored a
    chunk at a time (``warehouse.replace_window``). Returns the rows written and the sum of
    their probabilities."""
    scored_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    total = 0.0

    def frames():
        nonlocal total
        for frame, probability in batches:
            total += float(probability.sum())
            yield frame[["flight_id", "flight_date"]].assign(
                delay_probability=probability, model_version=str(version), scored_at=scored_at
            )

    conn.execute(PREDICTIONS_DDL)
    rows = replace_window(conn, "predictions.flight_delay", "flight_date", start, end, frames())
    return rows, total


def score(conn, estimator, start: dt.date, end: dt.date):
    """(flights, probabilities) of start..end, a month at a time."""
    for a, b in chunks(start, end):
        frame = m.load_frame(conn, a, b, labelled=False)
        if len(frame):
            yield frame, m.predict(estimator, frame)


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
    description="Delay probability of every flight of the day (cancelled ones included) by the champion model.",
    pool=keys.WAREHOUSE_POOL,
)
def flight_delay_predictions(
    context: AssetExecutionContext, warehouse: DuckDBResource, mlflow: MlflowTracking
) -> MaterializeResult:
    start, end = window_of(context)
    # the version champion_model promoted (its materialization), not whatever the alias says now
    version = str(upstream_metadata(context, keys.CHAMPION_MODEL,
                                    "no champion model yet: materialize the training group first")["model_version"])
    estimator = mlflow.load_model(version)
    with warehouse.get_connection() as conn:
        rows, total = write_predictions(conn, score(conn, estimator, start, end), version, start, end)
        metadata = table_metadata(conn, "predictions", "flight_delay", rows)
    return MaterializeResult(metadata={
        **metadata,
        "model_version": version,
        "mean_delay_probability": MetadataValue.float(total / rows if rows else float("nan")),
    })
