"""Load landing files into ``raw`` and ``quarantine`` in DuckDB.

Every source row ends in exactly one of ``raw.<source>`` (passes every rule) or
``quarantine.<source>`` (breaks one; ``_rule`` and ``_reason`` say which and why). A day is
replaced as a whole: its rows in both tables are deleted and re-inserted in the same
transaction, so a re-run never duplicates and a crash never leaves half a day.
One unreadable file rejects the run and writes nothing (see ``load``).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mlplatform.ingest.contracts import Contract
from mlplatform.ingest.landing import MissingLandingFile, find_file
from mlplatform.ingest.parse import LandingFileError, read_rows, scratch_connection, typed
from mlplatform.partitions import CHUNK_DAYS
from mlplatform.warehouse import create_tables, in_one_transaction, staging_table

if TYPE_CHECKING:
    import duckdb
    import pandas as pd

LINEAGE_COLUMNS = {
    "_partition_date": "DATE",
    "_source_file": "VARCHAR",
    "_source_row": "BIGINT",
    "_ingested_at": "TIMESTAMP",
}
QUARANTINE_COLUMNS = {"_rule": "VARCHAR", "_reason": "VARCHAR"}


class RejectedFiles(ValueError):
    """One or more landing files could not be loaded; nothing was written."""

    def __init__(self, errors: list[Exception]):
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{len(errors)} landing file(s) rejected, nothing loaded:\n{lines}")


@dataclass
class PartitionLoad:
    """What happened to one day (or one reference snapshot)."""

    source: str
    day: dt.date | None
    source_file: str | None
    loaded: int = 0
    quarantined: int = 0
    by_rule: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.loaded + self.quarantined

    @property
    def missing(self) -> bool:
        return self.source_file is None


def table_ddl(contract: Contract, schema: str) -> str:
    """The raw table of a source, or with schema ``quarantine`` (or the loader's staging schema)
    the same columns plus ``_rule`` and ``_reason``."""
    columns = dict(contract.columns) | LINEAGE_COLUMNS
    if schema != "raw":
        columns |= QUARANTINE_COLUMNS
    body = ", ".join(f'"{name}" {kind}' for name, kind in columns.items())
    return f"CREATE TABLE IF NOT EXISTS {schema}.{contract.name} ({body})"


def ensure_tables(conn: duckdb.DuckDBPyConnection, contract: Contract) -> None:
    for schema in ("raw", "quarantine"):
        create_tables(conn, f"CREATE SCHEMA IF NOT EXISTS {schema}; {table_ddl(contract, schema)}")


def _classify_sql(contract: Contract) -> str:
    """SELECT over ``batch`` adding ``_rule``/``_reason``: the first rule a row breaks, else a
    repeated key (the first occurrence in the file is kept)."""
    rules = contract.all_rules
    key = ", ".join(contract.key)
    dup = f"row_number() OVER (PARTITION BY _source_file, {key} ORDER BY _source_row) > 1"
    first = f"min(_source_row) OVER (PARTITION BY _source_file, {key})"
    rule_case = " ".join(f"WHEN {r.violation} THEN '{r.name}'" for r in rules)
    reason_case = " ".join(f"WHEN {r.violation} THEN {r.reason}" for r in rules)
    return f"""
        SELECT *,
            CASE {rule_case} WHEN {dup} THEN 'duplicate_key' END AS _rule,
            CASE {reason_case}
                 WHEN {dup} THEN 'key ({key}) repeats the row at line ' || {first} END AS _reason
        FROM batch
    """


def _read_all(contract: Contract, landing: Path, targets: list, scratch=None) -> tuple[dict, pd.DataFrame]:
    """Read every target's file. Returns {day: path or None} and one typed frame of all rows;
    raises RejectedFiles listing every file that could not be read. ``scratch``: see ``typed``."""
    import pandas as pd

    paths, frames, errors = {}, [], []
    for day in targets:
        try:
            paths[day] = find_file(landing, contract, day)
        except MissingLandingFile as exc:
            if contract.partitioned and not contract.required_daily:
                paths[day] = None  # a day with no delivery: loaded as empty
                continue
            errors.append(exc)
            continue
        except ValueError as exc:
            errors.append(exc)
            continue
        try:
            frame = read_rows(paths[day], contract)
        except LandingFileError as exc:
            errors.append(exc)
            continue
        frame["_partition_date"] = pd.Timestamp(day) if day else pd.NaT
        frames.append(frame)
    if not frames:
        columns = [*contract.columns, "_source_row", "_source_file", "_partition_date"]
        frames.append(pd.DataFrame({c: pd.Series(dtype=object) for c in columns}))
    rows = pd.concat(frames, ignore_index=True)
    batch, value_errors = typed(rows, contract, scratch)
    errors.extend(value_errors)
    if errors:
        raise RejectedFiles(errors)
    batch["_partition_date"] = rows["_partition_date"].astype("datetime64[ns]").to_numpy()
    return paths, batch


FAULT_PAUSE = "MLPLATFORM_FAULT_PAUSE_BEFORE_COMMIT"


def pause_before_commit(name: str) -> None:
    """Fault injection for the crash-recovery tests. With MLPLATFORM_FAULT_PAUSE_BEFORE_COMMIT set
    to ``<name>=<path>``, the load of ``name`` writes ``<path>`` once every row is written but
    before COMMIT, and waits there, so that a test can kill the process in the middle of a
    partition's write. Unset (as it always is outside those tests) it does nothing."""
    target, _, marker = os.environ.get(FAULT_PAUSE, "").partition("=")
    if marker and target == name:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(600)


# Files are parsed a month of days at a time: a day's rows as Python strings take ~40x their size
# on disk; a year of the 10x benchmark parsed at once took 9 GB, a month at a time 1.2 GB.
READ_DAYS = CHUNK_DAYS


def load(
    conn: duckdb.DuckDBPyConnection,
    contract: Contract,
    landing: Path,
    days: list[dt.date] | None = None,
    ingested_at: dt.datetime | None = None,
) -> list[PartitionLoad]:
    """Load the given days (or the reference snapshot when ``days`` is None) in one transaction.

    The files are read and classified a month at a time into a staging table
    (``_loading.<source>``); when any file is rejected, the rest are still read (to report every
    bad file), the staging table is dropped and nothing is written. Then one transaction replaces
    the days in raw and quarantine from the staging table. (Inserting the months inside that
    transaction instead would hold every uncommitted row in memory: DuckDB keeps a transaction's
    small appends in memory until it commits, 2 GB for a year of the 10x benchmark.)"""
    ingested_at = ingested_at or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    targets = sorted(days) if contract.partitioned else [None]
    ensure_tables(conn, contract)
    columns = ", ".join(f'"{c}"' for c in [*contract.columns, *LINEAGE_COLUMNS])
    staged = f"{columns}, _rule, _reason"
    paths, errors = {}, []
    scratch = scratch_connection()
    try:
        with staging_table(conn, contract.name, lambda schema: table_ddl(contract, schema)) as staging:
            for i in range(0, len(targets), READ_DAYS):
                try:
                    read, batch = _read_all(contract, landing, targets[i : i + READ_DAYS], scratch)
                except RejectedFiles as exc:
                    errors.extend(exc.errors)
                    continue
                paths.update(read)
                if errors:
                    continue  # nothing will be written: only look for more bad files
                batch["_ingested_at"] = ingested_at
                conn.register("batch", batch)
                conn.execute(f"INSERT INTO {staging} ({staged}) SELECT {staged} FROM ({_classify_sql(contract)})")
                conn.unregister("batch")
                del batch
            if errors:
                raise RejectedFiles(errors)
            counts = conn.execute(f"SELECT _source_file, coalesce(_rule, ''), count(*) FROM {staging} "
                                  "GROUP BY ALL").fetchall()
            window = ("WHERE _partition_date IN (SELECT unnest(?::DATE[]))", [targets]) if contract.partitioned \
                else ("", None)
            in_one_transaction(conn, [
                *((f"DELETE FROM {schema}.{contract.name} {window[0]}", window[1]) for schema in ("raw", "quarantine")),
                f"INSERT INTO raw.{contract.name} ({columns}) SELECT {columns} FROM {staging} WHERE _rule IS NULL",
                f"INSERT INTO quarantine.{contract.name} ({columns}, _rule, _reason) "
                f"SELECT {columns}, _rule, _reason FROM {staging} WHERE _rule IS NOT NULL",
            ], before_commit=lambda: pause_before_commit(contract.name))
    finally:
        scratch.close()
    by_file = {}
    for day, path in paths.items():
        by_file[str(path) if path else day] = PartitionLoad(contract.name, day, str(path) if path else None)
    for file, rule, n in counts:
        result = by_file[file]
        if rule:
            result.by_rule[rule] = n
            result.quarantined += n
        else:
            result.loaded = n
    return list(by_file.values())
