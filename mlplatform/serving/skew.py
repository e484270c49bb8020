"""Training-serving skew: does the server's own code, asked about real flights as a client asks,
produce the feature vectors of features.flight_features?

Both of the server's paths are compared with the table: the schedule's precomputed rows (the
snapshot copy, the batch SQL, the flight-key index) and the per-request SQL.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlplatform.serving.features import Snapshot
from mlplatform.serving.service import OnlineFeatures, Vectors
from mlplatform.training.model import CATEGORICAL, NUMERIC

# what a client sends for a flight; everything else the online path looks up
CLIENT_FIELDS = ["flight_date", "carrier", "flight_number", "origin", "dest", "sched_dep_time", "tailnum"]


def sample_offline(conn, rows: int, days: int, seed: float = 0.5) -> pd.DataFrame:
    """``rows`` random real flights of ``days`` random days of features.flight_features."""
    conn.execute("SELECT setseed(?)", [seed])
    return conn.execute(
        """
        WITH days AS (SELECT DISTINCT flight_date FROM features.flight_features ORDER BY random() LIMIT ?)
        SELECT * FROM features.flight_features WHERE flight_date IN (SELECT flight_date FROM days)
        ORDER BY random() LIMIT ?
        """,
        [days, rows],
    ).df()


def client_requests(offline: pd.DataFrame) -> list[dict]:
    out = []
    for row in offline[CLIENT_FIELDS].to_dict("records"):
        row["flight_date"] = pd.Timestamp(row["flight_date"]).date()
        row["flight_number"], row["sched_dep_time"] = int(row["flight_number"]), int(row["sched_dep_time"])
        row["tailnum"] = row["tailnum"] if isinstance(row["tailnum"], str) else None
        out.append(row)
    return out


def online_vectors(features: OnlineFeatures, snapshot: Snapshot, offline: pd.DataFrame) -> dict:
    """The server's vectors for the offline rows' flights, by both paths, and how many of the
    flights its schedule index did not find."""
    flights = client_requests(offline)
    dates = sorted({f["flight_date"] for f in flights})
    scheduled = features.schedule_features(snapshot, dates)
    rows = features.rows(flights, scheduled)
    return {
        "precomputed": features.lookup(flights, rows, scheduled, snapshot),
        "on_demand": features.lookup(flights, [None] * len(flights), scheduled, snapshot),
        "not_in_schedule": sum(r is None for r in rows),
    }


def mismatches(expected: Vectors, actual: Vectors, flight_ids: list[str]) -> list[dict]:
    """Every (flight, feature) whose values differ: exact equality, missing equal to missing."""
    out = []
    columns = [("categorical", i, name) for i, name in enumerate(CATEGORICAL)] + [
        ("numeric", i, name) for i, name in enumerate(NUMERIC)]
    for kind, i, name in columns:
        a, b = getattr(expected, kind)[:, i], getattr(actual, kind)[:, i]
        if kind == "numeric":
            differ = ~((a == b) | (np.isnan(a) & np.isnan(b)))
        else:
            differ = np.array([x != y for x, y in zip(a, b)], dtype=bool)
        for j in np.flatnonzero(differ):
            out.append({"flight_id": flight_ids[j], "feature": name, "offline": _plain(a[j]), "online": _plain(b[j])})
    for j in np.flatnonzero(expected.has_weather != actual.has_weather):
        out.append({"flight_id": flight_ids[j], "feature": "has_weather",
                    "offline": bool(expected.has_weather[j]), "online": bool(actual.has_weather[j])})
    return out


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def compare(features: OnlineFeatures, snapshot: Snapshot, offline: pd.DataFrame) -> dict:
    """Offline rows against both online paths: the check's whole verdict, as plain data."""
    expected = Vectors.from_features(offline)
    online = online_vectors(features, snapshot, offline)
    ids = offline["flight_id"].tolist()
    found = {path: mismatches(expected, online[path], ids) for path in ("precomputed", "on_demand")}
    return {"flights": len(offline), "days": offline["flight_date"].nunique(),
            "not_in_schedule": online["not_in_schedule"], **found}


