"""Training-serving skew: do the online features of real flights equal their offline rows?"""

from __future__ import annotations

import math

import pandas as pd

from mlplatform.serving.features import CompiledFeatures, compute_features, requests_frame

# what a client sends for a flight; everything else the online path looks up
CLIENT_FIELDS = ["flight_date", "carrier", "flight_number", "origin", "dest", "sched_dep_time", "tailnum"]


def sample_offline(conn, rows: int, seed: float = 0.5) -> pd.DataFrame:
    """A random sample of real flights from features.flight_features."""
    conn.execute("SELECT setseed(?)", [seed])
    return conn.execute(
        "SELECT * FROM features.flight_features ORDER BY random() LIMIT ?", [rows]
    ).df()


def online_for(conn, compiled: CompiledFeatures, offline: pd.DataFrame) -> pd.DataFrame:
    """The online features of the offline rows' flights, asked for as a client would."""
    flights = offline[CLIENT_FIELDS].to_dict("records")
    return compute_features(conn, compiled.sql, requests_frame(flights))


def mismatches(offline: pd.DataFrame, online: pd.DataFrame) -> list[dict]:
    """Every (flight, column) whose values differ: exact equality, NULL equal to NULL."""
    out = []
    columns = [c for c in online.columns if c != "flight_id" and c in offline.columns]
    for i, (off, on) in enumerate(zip(offline[columns].to_dict("records"), online[columns].to_dict("records"))):
        for column in columns:
            a, b = off[column], on[column]
            if _missing(a) and _missing(b):
                continue
            if _missing(a) or _missing(b) or _normal(a) != _normal(b):
                out.append({"flight_id": offline["flight_id"].iloc[i], "column": column,
                            "offline": _normal(a), "online": _normal(b)})
    return out


def _missing(value) -> bool:
    return value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value))


def _normal(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, pd.Timestamp):
        return value.date()
    return value
