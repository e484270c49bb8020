"""Strict reading of landing files into typed frames.

A file that cannot be read as a whole (empty, wrong encoding, wrong or duplicate columns,
a row with the wrong number of fields, text in a numeric column, a bad timestamp) raises
``LandingFileError`` naming the file, the line and the column. Such a file is rejected whole:
nothing from it is loaded and it stays in the landing zone. Rows that parse but break a rule
are not this module's business: see ``load``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

from mlplatform.ingest.contracts import DOUBLE, INTEGER, TEXT, TIMESTAMP, Contract

if TYPE_CHECKING:
    import pandas as pd


class LandingFileError(ValueError):
    def __init__(self, path: Path, line: int | None, column: str | None, message: str):
        self.path, self.line, self.column, self.message = Path(path), line, column, message
        where = [str(path)]
        if line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column '{column}'")
        super().__init__(f"{', '.join(where)}: {message}")


def read_landing_file(path: Path, contract: Contract) -> pd.DataFrame:
    """One file as a typed frame with the contract's columns plus ``_source_file`` and
    ``_source_row`` (the file's line number for CSV, 1-based row number for Parquet)."""
    frame, errors = typed(read_rows(path, contract), contract)
    if errors:
        raise errors[0]
    return frame


def read_rows(path: Path, contract: Contract) -> pd.DataFrame:
    """The file's rows, structure checked but values untyped (strings for CSV)."""
    path = Path(path)
    frame = _read_parquet(path, contract) if path.suffix == ".parquet" else _read_csv(path, contract)
    frame["_source_file"] = str(path)
    return frame


def _typed_sql(contract: Contract) -> str:
    """SELECT over ``rows`` (text) giving typed columns and, per column, a flag that is true
    where a present value does not convert."""
    select, flags = [], []
    for name, kind in contract.columns.items():
        text = f"nullif(nullif(trim(CAST(\"{name}\" AS VARCHAR)), ''), 'NA')"
        if kind == TEXT:
            value, failed = text, "false"
        elif kind == TIMESTAMP:
            value = f"timezone('UTC', TRY_CAST({text} AS TIMESTAMPTZ))"
            failed = f"{text} IS NOT NULL AND {value} IS NULL"
        elif kind == DOUBLE:
            number = f"TRY_CAST({text} AS DOUBLE)"
            value = f"CASE WHEN isfinite({number}) THEN {number} END"
            failed = f"{text} IS NOT NULL AND {value} IS NULL"
        else:
            number = f"TRY_CAST({text} AS DOUBLE)"
            value = f"CASE WHEN isfinite({number}) AND {number} % 1 = 0 THEN TRY_CAST({number} AS BIGINT) END"
            failed = f"{text} IS NOT NULL AND {value} IS NULL"
        select.append(f'{value} AS "{name}"')
        flags.append(f'{failed} AS "_bad_{name}"')
    return f"SELECT {', '.join(select)}, {', '.join(flags)}, _source_file, _source_row FROM rows"


EXPECTED = {TEXT: "text", TIMESTAMP: "an ISO 8601 timestamp", DOUBLE: "a number", INTEGER: "a whole number"}


def scratch_connection():
    """An in-memory DuckDB connection for ``typed`` (UTC): one per load, reused for each batch of
    files (a new DuckDB instance per call costs ~80 ms)."""
    import duckdb

    conn = duckdb.connect()
    conn.execute("SET TimeZone = 'UTC'")
    return conn


def typed(rows: pd.DataFrame, contract: Contract, conn=None) -> tuple[pd.DataFrame, list[LandingFileError]]:
    """Convert every column to the contract's type, for any number of files at once (in DuckDB,
    on ``conn`` from ``scratch_connection``, or a new one).

    Returns the typed frame of the files that converted cleanly, and one error for each file
    that did not: its first bad value by line."""
    import contextlib

    with contextlib.nullcontext(conn) if conn is not None else scratch_connection() as conn:
        conn.register("rows", rows)
        conn.execute(f"CREATE OR REPLACE TEMP TABLE typed AS {_typed_sql(contract)}")
        any_bad = " OR ".join(f'"_bad_{c}"' for c in contract.columns)
        bad_rows = conn.execute(
            f"SELECT * FROM typed WHERE {any_bad} "
            "QUALIFY row_number() OVER (PARTITION BY _source_file ORDER BY _source_row) = 1"
        ).df()
        errors = []
        for _, row in bad_rows.iterrows():
            column = next(c for c in contract.columns if row[f"_bad_{c}"])
            original = rows.loc[
                (rows["_source_file"] == row["_source_file"]) & (rows["_source_row"] == row["_source_row"]),
                column,
            ].iloc[0]
            errors.append(
                LandingFileError(
                    Path(row["_source_file"]),
                    int(row["_source_row"]),
                    column,
                    f"{str(original).strip()!r} is not {EXPECTED[contract.columns[column]]}",
                )
            )
        keep = ", ".join(f'"{c}"' for c in contract.columns)
        frame = conn.execute(
            f"SELECT {keep}, _source_file, _source_row FROM typed "
            # (the cast: a frame without rows has an object column DuckDB 1.5 reads as INTEGER)
            "WHERE _source_file::VARCHAR NOT IN (SELECT unnest(?::VARCHAR[])) ORDER BY _source_file, _source_row",
            [[str(e.path) for e in errors]],
        ).df()
        conn.execute("DROP TABLE typed")
        conn.unregister("rows")
    return frame, errors


def _check_header(path: Path, header: list[str], contract: Contract) -> None:
    seen = set()
    for name in header:
        if name in seen:
            raise LandingFileError(path, 1, name, "duplicate column in header")
        seen.add(name)
    missing = [c for c in contract.columns if c not in seen]
    extra = [c for c in header if c not in contract.columns]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected column(s) {', '.join(extra)}")
        raise LandingFileError(
            path, 1, (missing or extra)[0], "header does not match the contract: " + "; ".join(parts)
        )


def _read_csv(path: Path, contract: Contract) -> pd.DataFrame:
    import pandas as pd

    data = path.read_bytes()
    if not data.strip():
        raise LandingFileError(path, 1, None, "file is empty (expected a header row)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        field = data[line_start : exc.start].count(b",")
        header = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip().split(",")
        column = header[field] if field < len(header) else None
        raise LandingFileError(
            path, line, column, f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [h.strip() for h in next(reader)]
        _check_header(path, header, contract)
        rows, lines = [], []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                hint = " (truncated file?)" if len(row) < len(header) else ""
                column = header[len(row)] if len(row) < len(header) else None
                raise LandingFileError(
                    path, reader.line_num, column, f"expected {len(header)} fields, found {len(row)}{hint}"
                )
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise LandingFileError(path, reader.line_num, None, f"malformed CSV: {exc}") from None
    if rows and not text.endswith(("\n", "\r")):
        # A last line cut mid-value is only detectable by the missing line terminator.
        raise LandingFileError(path, lines[-1], None, "last line has no line terminator (truncated file?)")
    frame = pd.DataFrame(rows, columns=header, dtype=object)
    frame["_source_row"] = lines
    return frame


def _read_parquet(path: Path, contract: Contract) -> pd.DataFrame:
    import pandas as pd
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise LandingFileError(path, None, None, f"unreadable Parquet file: {exc}") from None
    _check_header(path, list(table.column_names), contract)
    frame = table.to_pandas()
    for name in frame.columns:  # values are typed by the same rules as CSV text
        column = frame[name]
        if pd.api.types.is_datetime64_any_dtype(column):
            column = column.dt.strftime("%Y-%m-%dT%H:%M:%S%z" if column.dt.tz else "%Y-%m-%dT%H:%M:%S")
        frame[name] = column.astype(object).where(column.notna(), None).map(
            lambda v: v if v is None or isinstance(v, str) else str(v)
        )
    frame["_source_row"] = range(1, len(frame) + 1)
    return frame
