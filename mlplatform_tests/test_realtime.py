"""The intraday (rt_) features end to end, on a real redis-server: a day's events published,
consumed by the daily run into the warehouse, the features computed as of each flight's
prediction time (recomputed by hand for sampled flights; events after it change nothing), and a
served rt_ feature that moves within seconds of a departure being published."""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import time

import duckdb
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from mlplatform.stream import events as ev
from mlplatform.stream.broker import Broker
from mlplatform_tests.conftest import D, failures, run_job

LANE = "integration"

DAYS = (D(2013, 1, 2), D(2013, 1, 3))
RT = ["rt_origin_departures_2h", "rt_origin_dep_delay_2h", "rt_origin_delayed_share_2h",
      "rt_carrier_origin_dep_delay_today", "rt_tail_prev_dep_delay", "rt_tail_departures_today"]


@pytest.fixture
def broker(home, redis_server, monkeypatch):
    """The test's redis-server as the platform's broker (MLPLATFORM_REDIS_URL)."""
    monkeypatch.setenv("MLPLATFORM_REDIS_URL", redis_server.url)
    broker = Broker(redis_server.url)
    yield broker
    broker.close()


def departures(bodies: list[dict]) -> pd.DataFrame:
    rows = [(b["flight"]["flight_id"], b["flight"]["flight_date"], b["flight"]["carrier"], b["flight"]["origin"],
             b["flight"]["tailnum"], pd.Timestamp(b["event_time"]).tz_convert(None), b["payload"]["dep_delay"])
            for b in bodies if b["kind"] == "departure"]
    return pd.DataFrame(rows, columns=["flight_id", "flight_date", "carrier", "origin", "tailnum", "event_time",
                                       "dep_delay"])


def by_hand(f, deps: pd.DataFrame) -> dict:
    """A flight's rt_ features from the published departures, as the README defines them."""
    pt = f.prediction_time
    before = deps[(deps.event_time < pt) & (deps.flight_id != f.flight_id)]
    origin = before[(before.origin == f.origin) & (before.event_time >= pt - pd.Timedelta(hours=2))]
    today = before[before.flight_date == str(f.flight_date)[:10]]
    carrier = today[(today.origin == f.origin) & (today.carrier == f.carrier)]
    tail = today[today.tailnum == f.tailnum].sort_values("event_time") if f.tailnum else today.iloc[:0]
    mean = lambda s: s.mean() if len(s) else None  # noqa: E731
    return {
        "rt_origin_departures_2h": len(origin),
        "rt_origin_dep_delay_2h": mean(origin.dep_delay),
        "rt_origin_delayed_share_2h": mean((origin.dep_delay > 15).astype(float)),
        "rt_carrier_origin_dep_delay_today": mean(carrier.dep_delay),
        "rt_tail_prev_dep_delay": tail.dep_delay.iloc[-1] if len(tail) else None,
        "rt_tail_departures_today": len(tail),
    }


def same(a, b) -> bool:
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b))
    return b is not None and not (isinstance(b, float) and math.isnan(b)) and abs(float(a) - float(b)) < 1e-9


def rt_of(home, day) -> pd.DataFrame:
    with duckdb.connect(str(home.warehouse), read_only=True) as conn:
        return conn.execute(f"SELECT flight_id, flight_date, carrier, origin, tailnum, prediction_time, {', '.join(RT)} "
                            "FROM features.flight_features WHERE flight_date = ? ORDER BY flight_id", [day]).df()


def test_rt_features_are_as_of_the_prediction_time(reference_home, broker, instance):
    home = reference_home
    done = ev.publish_days(broker, *DAYS)
    assert done["events"] > 3500 and done["days"] == 2
    result = run_job(instance, "daily_job", *DAYS)
    assert result.success, failures(result)
    assert broker.lag().total == 0  # the daily run consumed the stream

    # the stream and the day's batch file agree (the reconciliation check)
    checks = {e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
              for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert checks["stream_matches_batch"] is True

    day = DAYS[1]
    features = rt_of(home, day)
    assert len(features) > 900 and features.rt_origin_departures_2h.gt(0).mean() > 0.8
    # the prediction time: 60 minutes before the scheduled departure, in UTC (EST = UTC-5)
    first = features.iloc[0]
    hhmm = int(first.flight_id.rsplit("_", 1)[1])
    local = dt.datetime.combine(day, dt.time(hhmm // 100, hhmm % 100))
    assert first.prediction_time.to_pydatetime() == local + dt.timedelta(hours=5) - dt.timedelta(minutes=60)

    # recomputed by hand, from the published events, for sampled flights
    deps = departures([json.loads(m) for _, m in ev.day_messages(*DAYS)])
    sample = features.sample(40, random_state=3)
    sample = pd.concat([sample, features[features.rt_tail_departures_today > 0].head(10)])
    for f in sample.itertuples():
        expected = by_hand(f, deps)
        got = {c: getattr(f, c) for c in RT}
        wrong = {c: (expected[c], got[c]) for c in RT if not same(expected[c], got[c])}
        assert not wrong, (f.flight_id, wrong)

    # the server's own code (snapshot, schedule, on-demand SQL) gives the same rt_ features as the
    # table at the prediction time: the skew check, on days with a stream
    result = run_job(instance, "serving_check_job")
    assert result.success, failures(result)
    (check,) = [e.asset_check_evaluation_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert check.check_name == "online_features_match" and check.passed, check.description

    # events after a flight's prediction time never change its rt_ features: one minute after the
    # prediction time of sampled afternoon flights, a 300-minute departure at their origin, of their
    # carrier and aircraft; no flight whose prediction time is before all of them may change
    rng = random.Random(5)
    afternoon = features.flight_id.str[-4:].astype(int) >= 1500
    chosen = features[features.tailnum.notna() & afternoon].sample(15, random_state=4)
    late = []
    for f in chosen.itertuples():
        when = f.prediction_time + pd.Timedelta(minutes=1)
        late.append(json.dumps({
            "event_id": f"late-{f.flight_id}", "kind": "departure", "event_time": when.isoformat() + "Z",
            "flight": {"flight_id": f"{day}_{f.carrier}{9000 + rng.randrange(999)}_{f.origin}_0001",
                       "flight_date": str(day), "carrier": f.carrier, "flight_number": 9000, "origin": f.origin,
                       "dest": "ORD", "sched_dep_time": 1, "tailnum": f.tailnum},
            "payload": {"dep_delay": 300}}).encode())
    broker.publish(late)
    result = run_job(instance, "daily_job", day, day)
    assert result.success, failures(result)
    after = rt_of(home, day).set_index("flight_id")
    first_late = chosen.prediction_time.min() + pd.Timedelta(minutes=1)
    unaffected = features[features.prediction_time <= first_late]  # every late event is at or after their prediction time
    assert len(unaffected) >= 50 and chosen.flight_id.iloc[chosen.prediction_time.argmin()] in set(unaffected.flight_id)
    for f in unaffected.itertuples():
        changed = {c: (getattr(f, c), after.loc[f.flight_id, c]) for c in RT if not same(getattr(f, c), after.loc[f.flight_id, c])}
        assert not changed, (f.flight_id, changed)
    # ... while the flights whose prediction time comes after them see them (the test can fail)
    before = features.set_index("flight_id")
    moved = (after.rt_origin_departures_2h - before.rt_origin_departures_2h)
    assert moved.max() >= 1 and moved.min() == 0


def test_a_served_rt_feature_moves_within_seconds_of_a_departure(champion_home, broker):
    from mlplatform.serving.app import create_app
    from mlplatform.serving.service import PredictionService
    from mlplatform.settings import Settings

    settings = Settings.from_env()
    assert settings.redis_url == broker.url
    service = PredictionService.from_settings(settings, refresh_seconds=600)
    with TestClient(create_app(service)) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, client.get("/health").json()
            time.sleep(0.5)
        with duckdb.connect(str(champion_home.warehouse), read_only=True) as conn:
            flight = conn.execute(
                "SELECT flight_date, carrier, flight_number, origin, dest, sched_dep_time, tailnum, prediction_time "
                "FROM features.flight_features WHERE flight_date = '2013-02-06' AND sched_dep_time = 1000 "
                "ORDER BY flight_id LIMIT 1").df().iloc[0]
        body = {k: (str(v)[:10] if k == "flight_date" else v.item() if hasattr(v, "item") else v)
                for k, v in flight.drop("prediction_time").items()}
        pt = flight.prediction_time.to_pydatetime()

        def answer(**params):
            response = client.post("/predict", json=body, params={"explain": "true", **params})
            assert response.status_code == 200, response.text
            return response.json()

        def served(**params):
            return answer(**params)["features"]

        assert served()["rt_origin_departures_2h"] == 0  # the world was built without a stream
        # a departure from the flight's origin half an hour before its prediction time
        published = time.monotonic()
        broker.publish([json.dumps({
            "event_id": "live-1", "kind": "departure", "event_time": (pt - dt.timedelta(minutes=30)).isoformat() + "Z",
            "flight": {"flight_id": "2013-02-06_ZZ1_X_0001", "flight_date": "2013-02-06", "carrier": "UA",
                       "flight_number": 1, "origin": body["origin"], "dest": "ORD", "sched_dep_time": 1,
                       "tailnum": "N0LIVE"},
            "payload": {"dep_delay": 95}}).encode()])
        while (features := served())["rt_origin_departures_2h"] != 1:  # freshness p99 is benchmarks/' target
            assert time.monotonic() - published < 60, features
            time.sleep(0.05)
        assert features["rt_origin_dep_delay_2h"] == 95 and features["rt_origin_delayed_share_2h"] == 1
        # still a lookup: the flights the departure moved were computed again and scored off the
        # request path, to what the feature SQL answers for it on demand at its prediction time
        assert service.is_quick([body])
        on_demand = answer(as_of=pt.isoformat() + "Z")
        assert on_demand["features"] == features
        assert answer()["delay_probability"] == pytest.approx(on_demand["delay_probability"], abs=1e-12)
        # as of an instant before the departure, it does not count
        assert served(as_of=(pt - dt.timedelta(minutes=40)).isoformat() + "Z")["rt_origin_departures_2h"] == 0
        health = client.get("/health").json()
        assert health["features"]["stream"]["clock"].startswith(str(pt - dt.timedelta(minutes=30))[:16].replace(" ", "T"))


def test_the_stream_sensor_starts_micro_batches_that_show_in_the_ui(home, broker, instance):
    from dagster import AssetKey, build_sensor_context

    from mlplatform.definitions import load_defs
    from mlplatform.ingest.streamed import stream_sensor
    from mlplatform.settings import Settings

    settings = Settings.from_env()
    defs = load_defs(settings)

    def tick():
        return stream_sensor(settings)(build_sensor_context(instance=instance, definitions=defs))

    assert "nothing waits" in tick().skip_message
    ev.publish_days(broker, DAYS[0], DAYS[0])
    broker.publish([b"not json at all"])
    request = tick()
    assert request.run_key and "stream lag" in str(request.tags)
    result = defs.resolve_job_def("stream_ingest_job").execute_in_process(instance=instance, tags=request.tags)
    assert result.success
    assert "nothing waits" in tick().skip_message  # the run took everything

    # each micro-batch is an observation of raw_flight_events for the day it touched
    records = instance.fetch_observations(AssetKey("raw_flight_events"), limit=50).records
    observed = [r.asset_observation for r in records]
    # (the unreadable message has no day: an observation of the asset as a whole)
    assert {o.partition for o in observed} == {str(DAYS[0]), None}
    metadata = observed[0].metadata
    assert {"events", "quarantined", "lag_pending", "lag_undelivered", "last_event_time"} <= set(metadata)
    assert sum(o.metadata["events"].value for o in observed) == len(ev.day_messages(DAYS[0], DAYS[0]))
    assert sum(o.metadata["quarantined"].value for o in observed) == 1
    assert min(o.metadata["lag_undelivered"].value for o in observed) == 0
    with duckdb.connect(str(home.warehouse), read_only=True) as conn:
        assert conn.execute("SELECT _rule FROM quarantine.flight_events").fetchall() == [("parseable",)]


def test_the_reconciliation_names_what_the_stream_and_the_file_disagree_on(reference_home, broker, instance):
    day = DAYS[0]
    messages = [json.loads(m) for _, m in ev.day_messages(day, day)]
    departures_ = [b for b in messages if b["kind"] == "departure"]
    changed, dropped = departures_[10], departures_[20]
    changed["payload"]["dep_delay"] += 7  # the airport's system and the file disagree on a delay
    broker.publish([json.dumps(b).encode() for b in messages if b is not dropped])  # and one never streamed
    result = run_job(instance, "daily_job", day)
    assert result.success, failures(result)  # a warning: the file is the system of record
    (check,) = [e.asset_check_evaluation_data for e in result.all_events
                if e.event_type_value == "ASSET_CHECK_EVALUATION"
                and e.asset_check_evaluation_data.check_name == "stream_matches_batch"]
    assert not check.passed and check.severity.value == "WARN"
    text = check.description
    assert "1 departure(s) of the file not streamed" in text and dropped["flight"]["flight_id"] in text, text
    assert "1 delay(s) differ" in text and changed["flight"]["flight_id"] in text, text
