"""Validation gates over what is in ``raw`` for a range of days: plain functions over DuckDB.

Each returns an ``Outcome``; the Dagster layer turns it into an ``AssetCheckResult``. The
blocking ones (schema, key, rules, partition, quarantine share, unexplained nulls) stop
downstream; the trend ones (null-rate spike, row count) warn, because real days have storms and
holidays. Their defaults are defined here once; the Dagster config's fields default to them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mlplatform.ingest.contracts import WRONG_PARTITION, Contract
from mlplatform.ingest.load import LINEAGE_COLUMNS

if TYPE_CHECKING:
    import duckdb

TRAILING_DAYS = 14  # the trend checks compare a day with this many days before it
MAX_QUARANTINE_SHARE = 0.05
NULL_SPIKE_TOLERANCE = 0.30
# Largest share of a day's rows in which a column may be null without an explanation from the
# contract, unless the contract sets the column's own limit. Real 2013 days reach 3.7% (arr_delay
# and air_time of diverted flights, 2013-07-10) for flights and 1.6% for weather's columns
# without their own limit.
MAX_UNEXPLAINED_NULL_SHARE = 0.10


@dataclass
class Outcome:
    passed: bool
    description: str
    metadata: dict = field(default_factory=dict)


def _window(contract: Contract) -> str:
    return "_partition_date BETWEEN ? AND ?" if contract.partitioned else "true"


def _params(contract: Contract, start: dt.date | None, end: dt.date | None) -> list:
    return [start, end] if contract.partitioned else []


def schema_matches(conn: duckdb.DuckDBPyConnection, contract: Contract, *_) -> Outcome:
    expected = dict(contract.columns) | LINEAGE_COLUMNS
    rows = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'raw' AND table_name = ? ORDER BY ordinal_position",
        [contract.name],
    ).fetchall()
    actual = dict(rows)
    problems = [f"{c}: missing" for c in expected if c not in actual]
    problems += [f"{c}: unexpected" for c in actual if c not in expected]
    problems += [
        f"{c}: {actual[c]} instead of {t}" for c, t in expected.items() if c in actual and actual[c] != t
    ]
    return Outcome(
        not problems,
        "raw.%s matches its contract" % contract.name if not problems else "; ".join(problems),
        {"columns": len(actual), "problems": problems},
    )


def key_unique(conn, contract: Contract, start=None, end=None) -> Outcome:
    key = ", ".join(contract.key)
    dups = conn.execute(
        f"SELECT {key}, count(*) AS n FROM raw.{contract.name} WHERE {_window(contract)} "
        f"GROUP BY ALL HAVING count(*) > 1 ORDER BY n DESC LIMIT 5",
        _params(contract, start, end),
    ).fetchall()
    return Outcome(
        not dups,
        f"({key}) is unique" if not dups else f"{len(dups)}+ repeated keys, e.g. {dups[0]}",
        {"examples": [str(d) for d in dups]},
    )


def rules_hold(conn, contract: Contract, start=None, end=None) -> Outcome:
    """No row in raw breaks a row-level rule (they are quarantined on the way in)."""
    rules = [r for r in contract.all_rules if r is not WRONG_PARTITION]
    counts = conn.execute(
        "SELECT "
        + ", ".join(f"count(*) FILTER (WHERE {r.violation})" for r in rules)
        + f" FROM raw.{contract.name} WHERE {_window(contract)}",
        _params(contract, start, end),
    ).fetchone()
    broken = {r.name: n for r, n in zip(rules, counts) if n}
    return Outcome(
        not broken,
        "every row passes %d rules" % len(rules) if not broken else f"rules broken: {broken}",
        {"rules": len(rules), "broken": broken},
    )


def rows_in_partition(conn, contract: Contract, start, end) -> Outcome:
    n = conn.execute(
        f"SELECT count(*) FROM raw.{contract.name} WHERE {_window(contract)} AND ({WRONG_PARTITION.violation})",
        [start, end],
    ).fetchone()[0]
    return Outcome(n == 0, f"{n} rows dated outside their partition", {"misplaced_rows": n})


def quarantine_share(
    conn, contract: Contract, start=None, end=None, max_share: float = MAX_QUARANTINE_SHARE
) -> Outcome:
    """Per day, quarantined / delivered rows must not exceed ``max_share``: a file where many
    rows break rules means the upstream is broken, not that a few readings are."""
    part = "_partition_date" if contract.partitioned else "NULL"
    rows = conn.execute(
        f"""
        WITH r AS (SELECT {part} AS d, count(*) AS n FROM raw.{contract.name} WHERE {_window(contract)} GROUP BY 1),
             q AS (SELECT {part} AS d, count(*) AS n FROM quarantine.{contract.name} WHERE {_window(contract)} GROUP BY 1)
        SELECT d, coalesce(r.n, 0), coalesce(q.n, 0) FROM r FULL JOIN q USING (d) ORDER BY d
        """,
        _params(contract, start, end) * 2,
    ).fetchall()
    worst = max(rows, key=lambda r: r[2] / max(r[1] + r[2], 1), default=(None, 0, 0))
    share = worst[2] / max(worst[1] + worst[2], 1)
    bad = [str(d) for d, n, q in rows if q / max(n + q, 1) > max_share]
    total_q = sum(r[2] for r in rows)
    return Outcome(
        not bad,
        f"{total_q} rows quarantined; worst day {worst[0]} at {share:.1%} (limit {max_share:.0%})"
        + (f"; over the limit: {', '.join(bad[:10])}" if bad else ""),
        {"quarantined_rows": total_q, "worst_share": round(share, 4), "days_over_limit": bad},
    )


def _daily_history(conn, contract: Contract, start, end, lookback: int, select: str) -> list[tuple]:
    return conn.execute(
        f"SELECT _partition_date, {select} FROM raw.{contract.name} "
        "WHERE _partition_date BETWEEN ? AND ? GROUP BY 1 ORDER BY 1",
        [start - dt.timedelta(days=lookback), end],
    ).fetchall()


def null_rate_spike(
    conn, contract: Contract, start, end, lookback: int = TRAILING_DAYS, tolerance: float = NULL_SPIKE_TOLERANCE
) -> Outcome:
    """A column's null rate on a day exceeds its mean over the trailing ``lookback`` days by
    more than ``tolerance`` (absolute)."""
    columns = [c for c in contract.columns if c not in contract.nullable_spike_exempt]
    select = ", ".join(f'avg(("{c}" IS NULL)::INT)' for c in columns)
    history = _daily_history(conn, contract, start, end, lookback, select)
    spikes = []
    for i, (day, *rates) in enumerate(history):
        if day < start:
            continue
        trailing = [h for h in history[:i] if (day - h[0]).days <= lookback]
        if not trailing:
            continue
        for j, column in enumerate(columns):
            baseline = sum(t[j + 1] for t in trailing) / len(trailing)
            if rates[j] - baseline > tolerance:
                spikes.append(f"{day} {column}: {rates[j]:.0%} null vs {baseline:.0%} trailing")
    return Outcome(
        not spikes,
        "no null-rate spike" if not spikes else f"{len(spikes)} spikes: " + "; ".join(spikes[:5]),
        {"spikes": spikes[:50], "tolerance": tolerance},
    )


def nulls_explained(
    conn, contract: Contract, start, end, max_share: float = MAX_UNEXPLAINED_NULL_SHARE, lookback: int = TRAILING_DAYS
) -> Outcome:
    """No column is null, on any day, in more than its limit of the day's rows that the contract's
    explanations do not cover (for flights: cancellations). The limit is the contract's
    ``unexplained_null_limits`` for the column, else ``max_share``. A wave of nulls that comes
    with cancellations (the 2013-02-08 blizzard) passes and leaves the warning to
    ``null_rate_spike``; the same wave on flights that departed blocks the day. The message names
    the day, the column, its null rate against the trailing ``lookback`` days' and the share of
    the day's rows the explanations cover."""
    columns = list(contract.columns)
    explanations = {c: [e for e in contract.null_explanations if c in e.columns] for c in columns}
    unexplained = {
        c: " AND ".join([f'"{c}" IS NULL'] + [f"NOT coalesce({e.when}, false)" for e in explanations[c]])
        for c in columns
    }
    select = ", ".join(
        [f'avg(("{c}" IS NULL)::INT)' for c in columns]
        + [f"avg(({unexplained[c]})::INT)" for c in columns]
        + [f"avg(coalesce({e.when}, false)::INT)" for e in contract.null_explanations]
    )
    history = _daily_history(conn, contract, start, end, lookback, select)
    n = len(columns)
    failures, worst = [], {}
    for i, (day, *values) in enumerate(history):
        if day < start:
            continue
        rates, shares, explained = values[:n], values[n : 2 * n], values[2 * n :]
        trailing = [h[1 : n + 1] for h in history[:i] if (day - h[0]).days <= lookback]
        for j, column in enumerate(columns):
            if shares[j] > worst.get(column, (None, -1.0))[1]:
                worst[column] = (str(day), round(shares[j], 4))
            limit = contract.unexplained_null_limits.get(column, max_share)
            if shares[j] <= limit:
                continue
            baseline = (
                f"{sum(t[j] for t in trailing) / len(trailing):.0%} trailing" if trailing else "no trailing days"
            )
            covered = [
                f"{e.name} ({share:.0%} of rows)" for e, share in zip(contract.null_explanations, explained)
                if e in explanations[column]
            ]
            why = f"not explained by {' or '.join(covered)}" if covered else "no explanation in the contract"
            failures.append(
                f"{day} {column}: {rates[j]:.0%} null vs {baseline}; {why}: "
                f"{shares[j]:.0%} null otherwise (limit {limit:.0%})"
            )
    return Outcome(
        not failures,
        "every null is explained or within its limit"
        if not failures
        else f"{len(failures)} unexplained null wave(s): " + "; ".join(failures[:5]),
        {"failures": failures[:50], "worst_unexplained": worst, "default_limit": max_share,
         "limits": contract.unexplained_null_limits},
    )


def row_count_sane(
    conn, contract: Contract, start, end, lookback: int = TRAILING_DAYS, low: float = 0.5, high: float = 2.0
) -> Outcome:
    """Each day has rows, and between ``low`` and ``high`` times the trailing median."""
    history = _daily_history(conn, contract, start, end, lookback, "count(*)")
    counts = {d: n for d, n in history}
    problems, day = [], start
    while day <= end:
        n = counts.get(day, 0)
        trailing = sorted(counts[d] for d in counts if 0 < (day - d).days <= lookback)
        median = trailing[len(trailing) // 2] if trailing else None
        if n == 0:
            problems.append(f"{day}: no rows")
        elif median and not (low * median <= n <= high * median):
            problems.append(f"{day}: {n} rows vs trailing median {median}")
        day += dt.timedelta(days=1)
    return Outcome(
        not problems,
        f"{sum(counts.get(d, 0) for d in counts if d >= start)} rows; counts sane"
        if not problems
        else f"{len(problems)} days off: " + "; ".join(problems[:5]),
        {"problems": problems[:50]},
    )
