"""The event stream in the graph: micro-batches into ``raw.flight_events``, and each day's stream
reconciled with the next morning's batch file. Thin glue over ``mlplatform.stream``.

Where the consumer runs: in Dagster, as micro-batch runs. ``stream_sensor`` looks at the consumer
group's lag every ``MLPLATFORM_STREAM_SENSOR_INTERVAL_SECONDS`` and, when messages wait and no
micro-batch run is going, starts ``stream_ingest_job``, whose op consumes until the group has
nothing left (at most a minute) and records each micro-batch as an observation of
``raw_flight_events`` for the days it touched: events, quarantined, duplicates, the lag after it,
the last event time. A run, not a long-lived process: it holds the warehouse's one writer lock
only while it writes, shows in the UI like any run, and is retried by the next tick if it fails.
(What serving needs is not this: it reads the stream itself, within a second of publication.)

``raw_flight_events`` itself is daily: materialized with the day's batch file (the daily run), it
first consumes whatever is still waiting, then reconciles the day's streamed departures with the
file's (``stream_matches_batch``: the same flights, the same delays; the differences named). The
batch file stays the system of record: a day streamed incompletely, or not at all, warns.
"""


import datetime as dt
import os

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetObservation,
    ConfigurableResource,
    DagsterRunStatus,
    DefaultSensorStatus,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    RunsFilter,
    SkipReason,
    asset,
    job,
    op,
    sensor,
)
from pydantic import Field

from mlplatform import keys
from mlplatform.monitoring.costs import measured
from mlplatform.partitions import chunks, daily_partitions, days_between, single_run, window_of
from mlplatform.resources import Warehouse
from mlplatform.settings import Settings
from mlplatform.warehouse import create_tables

OWNERS = ["team:data-platform"]
MICRO_BATCH_SECONDS = 60  # the longest a micro-batch run consumes before it lets the next one start


class StreamBroker(ConfigurableResource):
    """The event stream's broker (``mlplatform.stream.broker``)."""

    url: str = Field(description="Redis URL (MLPLATFORM_REDIS_URL).")

    def connect(self):
        """The broker, or None when nothing answers at the URL (the stream is optional: the batch
        files are the system of record)."""
        from mlplatform.stream.broker import Broker

        broker = Broker(self.url)
        if broker.ping():
            return broker
        broker.close()
        return None


def broker_resource(settings: Settings) -> StreamBroker:
    return StreamBroker(url=settings.config("redis_url"))


def consumer_name(context) -> str:
    return f"{context.run_id[:8]}-{os.getpid()}"


def observation(batch, lag, day) -> AssetObservation:
    """The micro-batch's part of one day (None: messages quarantined with no readable day, an
    observation of the whole asset)."""
    events, quarantined = batch.days[day]
    return AssetObservation(asset_key=keys.RAW_FLIGHT_EVENTS, partition=str(day) if day else None, metadata={
        "micro_batch_messages": batch.messages,
        "events": events,
        "quarantined": quarantined,
        "duplicates_ignored": batch.duplicates,
        "claimed_from_dead_consumers": batch.claimed,
        "lag_pending": lag.pending,
        "lag_undelivered": lag.undelivered,
        "last_event_time": str(batch.last_event_time) if batch.last_event_time else "none",
        "seconds": MetadataValue.float(round(batch.seconds, 3)),
    })


@op(pool=keys.WAREHOUSE_POOL, description="Consume the event stream into raw.flight_events, micro-batch by "
    "micro-batch, until nothing waits (at most a minute); each micro-batch is an observation of raw_flight_events.")
def ingest_stream_events(context, broker: StreamBroker, warehouse: Warehouse) -> None:
    from mlplatform.stream.ingest import consume

    connected = broker.connect()
    if connected is None:
        context.log.warning("no broker answers at %s: nothing to consume", broker.url)
        return

    def report(batch, lag):
        for day in sorted(batch.days, key=str):
            context.log_event(observation(batch, lag, day))
        context.log.info("micro-batch: %d messages, %d events, %d quarantined, lag %d", batch.messages, batch.events,
                         batch.quarantined, lag.total)

    try:
        consume(connected, warehouse.database, consumer_name(context), max_seconds=MICRO_BATCH_SECONDS,
                on_batch=report)
    finally:
        connected.close()


@job(description="A micro-batch of the event stream into raw.flight_events (started by stream_sensor).")
def stream_ingest_job():
    ingest_stream_events()


def stream_sensor(settings: Settings):
    @sensor(
        name="stream_sensor", job=stream_ingest_job, default_status=DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=settings.stream_sensor_interval_seconds,
        description="Starts a micro-batch run (stream_ingest_job) when the event stream has messages the warehouse "
        "has not taken, and none is running.",
    )
    def _stream(context):
        from mlplatform.stream.broker import Broker

        broker = Broker(settings.redis_url)
        try:
            if not broker.ping():
                return SkipReason(f"no broker answers at {settings.redis_url}")
            lag = broker.lag()
        finally:
            broker.close()
        if lag.total == 0:
            return SkipReason(f"nothing waits in the stream (last message {lag.last_id})")
        going = context.instance.get_runs(RunsFilter(job_name="stream_ingest_job", statuses=[
            DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
            DagsterRunStatus.STARTED]), limit=1)
        if going:
            return SkipReason(f"{lag.total} messages wait; micro-batch run {going[0].run_id} is going")
        return RunRequest(run_key=f"stream:{lag.last_id}", tags={keys.TRIGGER_TAG: f"stream lag {lag.total}"})

    return _stream


def reconcile(conn, start: dt.date, end: dt.date) -> dict:
    """Per day of start..end: the batch file's departures (raw.flights with a departure time)
    against the stream's departure events: (batch, streamed, matched, delay mismatches, missing
    from the stream, not in the batch, examples). A month at a time: a year never streamed (every
    departure missing) stays a month's rows in memory."""
    found = {}
    for first, last in chunks(start, end):
        found.update(_reconcile(conn, first, last))
    return {day: found.get(day) for day in days_between(start, end)}


def _reconcile(conn, start: dt.date, end: dt.date) -> dict:
    rows = conn.execute("""
        with batch as (
            select _partition_date as day, carrier, flight, origin, sched_dep_time, dep_delay
            from raw.flights where dep_time is not null and _partition_date between ? and ?
        ),
        streamed as (
            select _partition_date as day, carrier, flight_number as flight, origin, sched_dep_time, dep_delay
            from raw.flight_events where kind = 'departure' and _partition_date between ? and ?
        ),
        paired as (
            select coalesce(b.day, s.day) as day, b.day is not null as in_batch, s.day is not null as in_stream,
                   b.dep_delay is distinct from s.dep_delay as differs,
                   [strftime(coalesce(b.day, s.day), '%Y-%m-%d'), coalesce(b.carrier, s.carrier),
                    cast(coalesce(b.flight, s.flight) as varchar), coalesce(b.origin, s.origin),
                    cast(coalesce(b.sched_dep_time, s.sched_dep_time) as varchar)] as key
            from batch b full join streamed s using (day, carrier, flight, origin, sched_dep_time)
        ),
        -- five examples of each kind of disagreement a day, not lists of them all
        ranked as (
            select *, row_number() over (partition by day, in_batch and in_stream and differs, in_stream
                                         order by key) as nth
            from paired
        )
        select day,
               count(*) filter (where in_batch) as batch, count(*) filter (where in_stream) as streamed,
               count(*) filter (where in_batch and in_stream and not differs) as matched,
               list(key order by key) filter (where in_batch and in_stream and differs and nth <= 5) as mismatched,
               count(*) filter (where in_batch and in_stream and differs) as n_mismatched,
               count(*) filter (where not in_stream) as missing,
               list(key order by key) filter (where not in_stream and nth <= 5) as missing_examples,
               count(*) filter (where not in_batch) as extra
        from ranked group by 1 order by 1""", [start, end, start, end]).fetchall()
    # the examples named by their flight ids
    return {r[0]: (*r[:4], [keys.flight_id(*k) for k in r[4] or []], r[5], r[6],
                   [keys.flight_id(*k) for k in r[7] or []], r[8]) for r in rows}


@asset(
    key=keys.RAW_FLIGHT_EVENTS,
    group_name="ingest",
    deps=[keys.RAW_FLIGHTS],
    partitions_def=daily_partitions,
    backfill_policy=single_run,
    kinds={"redis", "duckdb"},
    owners=OWNERS,
    tags={"layer": "raw", "daily": ""},
    description="raw.flight_events: the airports' events (departures, arrivals, cancellations, hourly weather) "
    "as streamed, exactly once per event_id (quarantine.flight_events for the malformed). Materialized with the "
    "day's batch file: what is still waiting in the stream is consumed, then the day is reconciled with the file.",
    check_specs=[AssetCheckSpec(
        "stream_matches_batch", asset=keys.RAW_FLIGHT_EVENTS,
        description="Every departure of the day's batch file was streamed, with the same departure delay, and the "
        "stream has no departure the file lacks (warns: the file is the system of record).",
    )],
    pool=keys.WAREHOUSE_POOL,
)
@measured
def raw_flight_events(context: AssetExecutionContext, broker: StreamBroker, warehouse: Warehouse) -> MaterializeResult:
    from mlplatform.stream.ingest import consume, events_ddl

    start, end = window_of(context)
    connected = broker.connect()
    consumed = 0
    if connected is not None:
        try:
            consumed = sum(b.messages for b in consume(connected, warehouse.database, consumer_name(context),
                                                       max_seconds=600))
        finally:
            connected.close()
    else:
        context.log.warning("no broker answers at %s: the days are reconciled with what the warehouse has", broker.url)
    with warehouse.get_connection() as conn:
        create_tables(conn, events_ddl(conn))
        days = reconcile(conn, start, end)
        counts = dict(conn.execute(
            "SELECT kind, count(*) FROM raw.flight_events WHERE _partition_date BETWEEN ? AND ? GROUP BY 1",
            [start, end]).fetchall())
        quarantined = conn.execute("SELECT count(*) FROM quarantine.flight_events WHERE _partition_date BETWEEN ? AND ?",
                                   [start, end]).fetchone()[0]
    unstreamed = [str(d) for d, r in days.items() if r is None or r[2] == 0]
    problems = []
    for day, r in days.items():
        if r is None or r[2] == 0:
            continue
        _, batch_n, streamed, matched, mismatched, n_mismatched, missing, missing_examples, extra = r
        parts = []
        if missing:
            parts.append(f"{missing} departure(s) of the file not streamed (e.g. {', '.join(missing_examples)})")
        if n_mismatched:
            parts.append(f"{n_mismatched} delay(s) differ (e.g. {', '.join(mismatched)})")
        if extra:
            parts.append(f"{extra} streamed departure(s) not in the file")
        if parts:
            problems.append(f"{day}: " + ", ".join(parts))
    description = ("; ".join(problems[:10]) or f"{sum(r[3] for r in days.values() if r)} departures streamed and "
                   f"matched") + (f"; not streamed at all: {', '.join(unstreamed[:10])}" if unstreamed else "")
    # a day never streamed fails the check only when the stream is in use (a broker answered): the
    # stream is optional, the file is the system of record
    failed = bool(problems) or (bool(unstreamed) and connected is not None)
    if connected is None:
        description += " (no broker answers: the stream is not in use)"
    return MaterializeResult(
        metadata={
            "dagster/row_count": sum(counts.values()),
            "events_by_kind": MetadataValue.json(counts),
            "quarantined": quarantined,
            "consumed_now": consumed,
            "days_not_streamed": MetadataValue.json(unstreamed),
        },
        check_results=[AssetCheckResult(
            check_name="stream_matches_batch", passed=not failed,
            severity=AssetCheckSeverity.WARN, description=description,
        )],
    )
