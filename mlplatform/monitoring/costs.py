"""Compute cost per asset: each asset step's wall seconds, CPU seconds and peak memory, on its
materializations, as rows of ``monitoring.asset_costs``, and summed per asset, group and day.

    @measured asset steps --(materialization metadata cost/*)--> Dagster's event log
        --> monitoring/asset_costs: monitoring.asset_costs (a row per run and asset), and the report
            (the most expensive assets, per group, per day, at a price per CPU-hour) as its metadata

The measurement (``Measurement``), around the asset's compute function (``measured``):

* wall seconds: ``time.perf_counter``;
* CPU seconds: ``getrusage`` of the process (``RUSAGE_SELF``: every thread; the steps of a run
  execute one at a time in the run's process) plus ``RUSAGE_CHILDREN`` (the processes the step
  waited for: dbt);
* peak RSS of the process while the step ran: ``VmHWM`` when the step raised the process's high
  water mark (exact), else the largest of a sampler's readings of ``/proc/self/statm`` every
  ``SAMPLE_SECONDS`` (a lower bound: a spike between two readings is missed). ``VmHWM`` is not
  reset (``/proc/self/clear_refs``): that would erase the process's own peak from ``wait4``'s
  ``ru_maxrss``, which the benchmarks (and ``/usr/bin/time``) report as the run's peak;
* peak RSS of the largest child the step started, apart (as the benchmarks count it): the
  sampler's readings of the children that were not there when the step began (a child that
  lives less than ``SAMPLE_SECONDS`` may be missed). Not ``RUSAGE_CHILDREN``'s ``ru_maxrss``: it
  is the largest of every child the process ever waited for, and a forked child's counts the
  parent's pages it shared before its ``exec`` (``git --version`` started by a 600 MiB process: 612 MiB).

A step that materializes several assets (dbt's models, ``model_evaluation``) has its figures
split between them by dbt's per-model execution time when every one has it, in equal shares
otherwise: the rows add up to the step. Peaks are not split (each asset gets the step's). A range
of days is one step: it is recorded once, with its partitions ("2013-01-01..2013-01-28") and their
count; Dagster copies the metadata onto every partition's materialization, the table has one row.

The rows are written by the report asset, from the event log, not by every step: no step holds
another writer of the warehouse, and a measurement costs no I/O. ``collect`` reads the
materializations recorded since the last report (less ``OVERLAP_SECONDS``: events a concurrent
commit stored late are not missed), and ``record`` replaces the rows of their (run, asset) in one
transaction: running the report again adds nothing twice. A failed step makes no materialization
and is not counted.
"""

import datetime as dt
import functools
import inspect
import os
import resource
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    AssetsDefinition,
    Config,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)
from dagster_duckdb import DuckDBResource
from pydantic import Field

from mlplatform import keys
from mlplatform.warehouse import create_tables, has_table, in_one_transaction

if TYPE_CHECKING:
    import pandas as pd

# --- the metadata every measured materialization carries
SECONDS = "cost/seconds"                # wall seconds (this asset's share of its step)
CPU_SECONDS = "cost/cpu_seconds"        # CPU seconds of the process and its children (this asset's share)
PEAK_RSS = "cost/peak_rss_mib"          # the step's process at its largest
CHILD_PEAK_RSS = "cost/child_peak_rss_mib"  # the step's largest child (dbt) at its largest
STEP_SECONDS = "cost/step_seconds"      # the whole step's (several assets share a step)
STEP_CPU_SECONDS = "cost/step_cpu_seconds"
PARTITIONS = "cost/partitions"          # "2013-01-01..2013-01-28", one day, or "" (unpartitioned)
PARTITION_COUNT = "cost/partition_count"
DBT_DURATION = "Execution Duration"     # dagster-dbt's per-model seconds (the weights of a dbt step's split)

SAMPLE_SECONDS = 0.25  # how often the sampler reads the step's memory (as the benchmarks' sampler): 0.2% of a core
OVERLAP_SECONDS = 3600.0  # how far before the last recorded materialization the next report reads again
PRICE_PER_CPU_HOUR = 0.048  # a cloud vCPU-hour on demand (e.g. 4 vCPUs for $0.19/h), in your currency
REPORT_DAYS = 30       # the report's window
TOP_ASSETS = 8         # the most expensive assets shown inline (the UI folds Markdown over 1,000 characters)
MIB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Figures:
    seconds: float
    cpu_seconds: float
    peak_rss: int        # bytes
    child_peak_rss: int  # bytes


def _cpu(usage) -> float:
    return usage.ru_utime + usage.ru_stime


def _rss(pid: str | int = "self") -> int:
    """The resident set of a process now, in bytes (0 when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _high_water_mark() -> int:
    """The process's peak resident set so far (VmHWM), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children() -> set[int]:
    """The process's children (of any of its threads)."""
    found = set()
    try:
        for task in os.listdir("/proc/self/task"):
            try:
                found.update(int(pid) for pid in Path(f"/proc/self/task/{task}/children").read_text().split())
            except OSError:
                continue  # (the thread ended)
    except OSError:
        pass
    return found


class _Sampler(threading.Thread):
    """The largest resident set of the process and of any of its children, read every ``interval``."""

    def __init__(self, interval: float):
        super().__init__(name="mlplatform-cost-sampler", daemon=True)
        self.interval, self.done = interval, threading.Event()
        self.peak = self.child_peak = 0
        self.before = _children()  # (not the step's)

    def sample(self) -> None:
        self.peak = max(self.peak, _rss())
        for pid in _children() - self.before:
            self.child_peak = max(self.child_peak, _rss(pid))

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.sample()


class Measurement:
    """``with Measurement() as m: ...`` then ``m.figures``: the block's wall and CPU seconds and
    peak memory (see the module's docstring)."""

    def __init__(self, interval: float = SAMPLE_SECONDS):
        self.interval = interval
        self.figures: Figures | None = None

    def __enter__(self) -> "Measurement":
        self._sampler = _Sampler(self.interval)
        self._sampler.sample()
        self._high_water = _high_water_mark()
        self._self, self._children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        self._sampler.start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        seconds = time.perf_counter() - self._start
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        self._sampler.stop()
        high_water = _high_water_mark()
        peak = high_water if high_water > self._high_water else self._sampler.peak
        cpu = _cpu(own) - _cpu(self._self) + _cpu(children) - _cpu(self._children)
        self.figures = Figures(seconds, cpu, peak, self._sampler.child_peak)


def split(figures: Figures, weights: list[float]) -> list[Figures]:
    """The step's seconds and CPU seconds in shares proportional to ``weights`` (equal shares when
    any is missing or none is positive); each share keeps the step's peaks."""
    if not weights:
        return []
    if any(w is None or w < 0 for w in weights) or sum(weights) <= 0:
        weights = [1.0] * len(weights)
    total = sum(weights)
    return [replace(figures, seconds=figures.seconds * w / total, cpu_seconds=figures.cpu_seconds * w / total)
            for w in weights]


def partitions_of(context) -> tuple[str, int]:
    """("first..last" or the one partition, how many) of the step, ("", 0) when unpartitioned."""
    if not context.has_partition_key_range:
        return "", 0
    span = context.partition_key_range
    return (span.start if span.start == span.end else f"{span.start}..{span.end}"), len(context.partition_keys)


def cost_metadata(share: Figures, step: Figures, partitions: tuple[str, int]) -> dict:
    return {
        SECONDS: MetadataValue.float(round(share.seconds, 4)),
        CPU_SECONDS: MetadataValue.float(round(share.cpu_seconds, 4)),
        PEAK_RSS: MetadataValue.float(round(share.peak_rss / MIB, 1)),
        CHILD_PEAK_RSS: MetadataValue.float(round(share.child_peak_rss / MIB, 1)),
        STEP_SECONDS: MetadataValue.float(round(step.seconds, 4)),
        STEP_CPU_SECONDS: MetadataValue.float(round(step.cpu_seconds, 4)),
        PARTITIONS: partitions[0],
        PARTITION_COUNT: MetadataValue.int(partitions[1]),
    }


def _weight(event) -> float | None:
    value = (event.metadata or {}).get(DBT_DURATION)
    value = getattr(value, "value", value)
    return float(value) if isinstance(value, (int, float)) else None


def with_costs(context, events: list, figures: Figures) -> list:
    """``events`` with the step's figures added to the metadata of its materializations (``Output``
    and ``MaterializeResult``, split between them: ``split``); anything else unchanged."""
    made = [i for i, event in enumerate(events) if isinstance(event, (Output, MaterializeResult))]
    partitions = partitions_of(context)
    events = list(events)
    for i, share in zip(made, split(figures, [_weight(events[i]) for i in made])):
        event = events[i]
        metadata = {**(event.metadata or {}), **cost_metadata(share, figures, partitions)}
        events[i] = event.with_metadata(metadata) if isinstance(event, Output) else MaterializeResult(
            asset_key=event.asset_key, metadata=metadata, check_results=event.check_results,
            data_version=event.data_version, tags=event.tags, value=event.value)
    return events


def measured(fn):
    """Measure an asset's compute function (``Measurement``) and add the figures to the
    materializations it makes (``with_costs``). Put it under ``@asset``/``@multi_asset``/
    ``@dbt_assets``; the function takes the context first. Dagster reads the signature through
    ``__wrapped__``; a generator stays a generator, whose events are held until it ends (the
    step's figures are known then) and, when it fails, passed on unchanged before the error."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def measured_generator(context, *args, **kwargs):
            events = []
            try:
                with Measurement() as measurement:
                    events.extend(fn(context, *args, **kwargs))
            except BaseException:
                yield from events
                raise
            yield from with_costs(context, events, measurement.figures)

        return measured_generator

    @functools.wraps(fn)
    def measured_function(context, *args, **kwargs):
        with Measurement() as measurement:
            result = fn(context, *args, **kwargs)
        if isinstance(result, MaterializeResult):
            return with_costs(context, [result], measurement.figures)[0]
        if isinstance(result, tuple) and result and all(isinstance(r, MaterializeResult) for r in result):
            return tuple(with_costs(context, list(result), measurement.figures))
        context.add_output_metadata(cost_metadata(measurement.figures, measurement.figures, partitions_of(context)))
        return result

    return measured_function


# --- the table and the report -------------------------------------------------------------------

COSTS_DDL = """
CREATE SCHEMA IF NOT EXISTS monitoring;
CREATE TABLE IF NOT EXISTS monitoring.asset_costs (
    run_id             VARCHAR NOT NULL,
    asset_key          VARCHAR NOT NULL,   -- a row per run and asset: (run_id, asset_key) is its key
    group_name         VARCHAR,
    job_name           VARCHAR,
    step_key           VARCHAR,
    partitions         VARCHAR,            -- '2013-01-01..2013-01-28', one day, or '' (unpartitioned)
    partition_count    INTEGER,
    cost_date          DATE NOT NULL,      -- the UTC day the step ended
    recorded_at        TIMESTAMP NOT NULL, -- its materialization (UTC)
    seconds            DOUBLE NOT NULL,    -- wall seconds (the asset's share of its step)
    cpu_seconds        DOUBLE NOT NULL,    -- CPU seconds, the step's process and the children it waited for
    peak_rss_mib       DOUBLE,             -- the step's process at its largest
    child_peak_rss_mib DOUBLE,             -- its largest child (dbt)
    step_seconds       DOUBLE,
    step_cpu_seconds   DOUBLE
);
"""
COLUMNS = ["run_id", "asset_key", "group_name", "job_name", "step_key", "partitions", "partition_count", "cost_date",
           "recorded_at", "seconds", "cpu_seconds", "peak_rss_mib", "child_peak_rss_mib", "step_seconds",
           "step_cpu_seconds"]


def _value(metadata: Mapping, key: str):
    value = metadata.get(key)
    return getattr(value, "value", value)


def collect(instance, groups: Mapping[AssetKey, str], after: float | None = None, page: int = 1000) -> "pd.DataFrame":
    """A row per (run, asset) of the measured materializations the instance recorded after the
    timestamp ``after`` (every one when None), as ``monitoring.asset_costs`` has them."""
    import pandas as pd

    rows: dict[tuple[str, str], dict] = {}
    for key in instance.get_asset_keys():
        cursor = None
        while True:
            found = instance.fetch_materializations(AssetRecordsFilter(asset_key=key, after_timestamp=after),
                                                    limit=page, cursor=cursor, ascending=True)
            for record in found.records:
                metadata = record.asset_materialization.metadata
                name = key.to_user_string()
                if SECONDS not in metadata or (record.run_id, name) in rows:
                    continue  # not measured, or another partition of the same step
                when = dt.datetime.fromtimestamp(record.timestamp, dt.timezone.utc).replace(tzinfo=None)
                entry = record.event_log_entry
                rows[(record.run_id, name)] = {
                    "run_id": record.run_id, "asset_key": name, "group_name": groups.get(key),
                    "job_name": entry.job_name, "step_key": entry.step_key,
                    "partitions": _value(metadata, PARTITIONS), "partition_count": _value(metadata, PARTITION_COUNT),
                    "cost_date": when.date(), "recorded_at": when,
                    **{column: _value(metadata, k) for column, k in [
                        ("seconds", SECONDS), ("cpu_seconds", CPU_SECONDS), ("peak_rss_mib", PEAK_RSS),
                        ("child_peak_rss_mib", CHILD_PEAK_RSS), ("step_seconds", STEP_SECONDS),
                        ("step_cpu_seconds", STEP_CPU_SECONDS)]},
                }
            if not found.has_more:
                break
            cursor = found.cursor
    return pd.DataFrame(list(rows.values()), columns=COLUMNS)


def last_recorded(conn) -> float | None:
    """The timestamp of the latest materialization in ``monitoring.asset_costs`` (None: empty)."""
    if not has_table(conn, "monitoring", "asset_costs"):
        return None
    return conn.execute("SELECT epoch(max(recorded_at)) FROM monitoring.asset_costs").fetchone()[0]


def record(conn, rows: "pd.DataFrame") -> int:
    """Replace the rows of the (run, asset) pairs in ``rows`` with them, in one transaction."""
    create_tables(conn, COSTS_DDL)
    if rows.empty:
        return 0
    columns = ", ".join(COLUMNS)
    conn.register("new_costs", rows[COLUMNS])
    try:
        in_one_transaction(conn, [
            "DELETE FROM monitoring.asset_costs c USING new_costs n WHERE c.run_id = n.run_id "
            "AND c.asset_key = n.asset_key",
            f"INSERT INTO monitoring.asset_costs ({columns}) SELECT {columns} FROM new_costs",
        ])
    finally:
        conn.unregister("new_costs")
    return len(rows)


def summarize(conn, price_per_cpu_hour: float, since: dt.date) -> dict[str, "pd.DataFrame"]:
    """The costs from ``since`` on, per asset, per group and per day (most expensive first; days in
    order): runs, wall seconds, CPU seconds, the price of those at ``price_per_cpu_hour``, and the
    largest peak of the process and of a child."""
    figures = ("count(*) AS runs, sum(seconds) AS seconds, sum(cpu_seconds) AS cpu_seconds, "
               "sum(cpu_seconds) / 3600 * ? AS cost, max(peak_rss_mib) AS peak_rss_mib, "
               "max(child_peak_rss_mib) AS child_peak_rss_mib")
    where = "FROM monitoring.asset_costs WHERE cost_date >= ?"
    return {
        "asset": conn.execute(f"SELECT asset_key, any_value(group_name) AS group_name, {figures} {where} "
                              "GROUP BY asset_key ORDER BY cpu_seconds DESC, asset_key",
                              [price_per_cpu_hour, since]).df(),
        "group": conn.execute(f"SELECT coalesce(group_name, '(none)') AS group_name, {figures} {where} GROUP BY 1 "
                              "ORDER BY cpu_seconds DESC, group_name", [price_per_cpu_hour, since]).df(),
        "day": conn.execute(f"SELECT cost_date, {figures} {where} GROUP BY cost_date ORDER BY cost_date",
                            [price_per_cpu_hour, since]).df(),
    }


def markdown(frame: "pd.DataFrame", label: str, price: float) -> str:
    """A table of ``frame`` (a ``summarize`` part) for the UI: its ``label`` column, runs, seconds,
    CPU seconds, cost, peak MiB."""
    lines = [f"| {label} | runs | wall s | CPU s | cost @{price:g}/CPU-h | peak MiB (child) |", "|---|---|---|---|---|---|"]
    lines += [f"| {getattr(r, frame.columns[0])} | {r.runs} | {r.seconds:.1f} | {r.cpu_seconds:.1f} | {r.cost:.4f} | "
              f"{r.peak_rss_mib:.0f} ({r.child_peak_rss_mib:.0f}) |" for r in frame.itertuples()]
    return "\n".join(lines)


class CostReportConfig(Config):
    price_per_cpu_hour: float = Field(PRICE_PER_CPU_HOUR, description="What a CPU-hour costs (the report's cost "
                                      "column: CPU seconds / 3600 x this).")
    days: int = Field(REPORT_DAYS, description="The report covers the costs of the last this many days (UTC).")


def cost_report(groups: Mapping[AssetKey, str]) -> AssetsDefinition:
    """The ``monitoring/asset_costs`` asset, naming each asset's group from ``groups``
    (``definitions.build_defs``: every asset of the code location) and its own."""
    groups = {**groups, keys.ASSET_COSTS: "monitoring"}

    @asset(
        key=keys.ASSET_COSTS,
        group_name="monitoring",
        kinds={"dagster", "duckdb"},
        owners=["team:ml-platform"],
        pool=keys.WAREHOUSE_POOL,
        description="The compute cost of every asset step (wall and CPU seconds, peak memory) from the event log's "
        "materializations into monitoring.asset_costs, a row per run and asset; the most expensive assets and the "
        "totals per group and day at a price per CPU-hour as metadata.",
    )
    @measured
    def asset_costs(context: AssetExecutionContext, config: CostReportConfig, warehouse: DuckDBResource):
        with warehouse.get_connection() as conn:
            latest = last_recorded(conn)
        rows = collect(context.instance, groups, None if latest is None else latest - OVERLAP_SECONDS)
        since = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=config.days - 1)
        with warehouse.get_connection() as conn:
            written = record(conn, rows)
            report = summarize(conn, config.price_per_cpu_hour, since)
            total = conn.execute("SELECT count(*) FROM monitoring.asset_costs").fetchone()[0]
        by_asset, price = report["asset"], config.price_per_cpu_hour
        context.log.info("%d (run, asset) rows recorded; %d assets cost %.1f CPU-s since %s", written, len(by_asset),
                         by_asset["cpu_seconds"].sum(), since)
        return MaterializeResult(metadata={
            "dagster/row_count": MetadataValue.int(int(total)),
            "rows_recorded": MetadataValue.int(written),
            "since": str(since),
            "price_per_cpu_hour": MetadataValue.float(price),
            "total_seconds": MetadataValue.float(round(float(by_asset["seconds"].sum()), 3)),
            "total_cpu_seconds": MetadataValue.float(round(float(by_asset["cpu_seconds"].sum()), 3)),
            "total_cost": MetadataValue.float(round(float(by_asset["cost"].sum()), 6)),
            "most_expensive": MetadataValue.md(markdown(by_asset.drop(columns="group_name").head(TOP_ASSETS),
                                                        "asset", price)),
            "by_group": MetadataValue.md(markdown(report["group"], "group", price)),
            "by_day": MetadataValue.md(markdown(report["day"], "day", price)),
        })

    return asset_costs
