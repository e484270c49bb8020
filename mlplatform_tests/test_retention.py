"""Retention (issue 19): the policies applied by ``retention_job`` on a copy of the trained world,
with versions in every state, old profiles, days of inference log and old runs, all real."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil

import duckdb
import pytest

LANE = "integration"
NOW = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
TODAY = NOW.date()
# the inference log's columns as the rollout reads them
COLUMNS = {"ts": "TIMESTAMPTZ", "request_id": "VARCHAR", "model_version": "VARCHAR", "stage": "VARCHAR",
           "delay_probability": "DOUBLE", "latency_ms": "DOUBLE", "error": "VARCHAR"}


def ago(days: float) -> dt.datetime:
    return NOW - dt.timedelta(days=days)


def register(mlflow, n: int) -> str:
    """A real registered version of the model (a small scikit-learn model, its run's artifacts)."""
    import mlflow as mlflow_api
    import numpy as np
    from mlflow import sklearn as mlflow_sklearn
    from sklearn.linear_model import LogisticRegression

    x = np.arange(20, dtype=float).reshape(10, 2)
    estimator = LogisticRegression().fit(x, np.arange(10) % 2)
    with mlflow.start_run(f"retention test {n}", {}):
        mlflow_api.log_dict({"n": n}, "features.json")
        info = mlflow_sklearn.log_model(estimator, name="model", registered_model_name=mlflow.registered_model,
                                        await_registration_for=0, pip_requirements=["scikit-learn"])
    return str(info.registered_model_version)


def promoted(conn, name: str, version: str, when: dt.datetime, decision: str = "promoted",
             applied: bool = True) -> None:
    from mlplatform.training import promotion

    evaluation = promotion.Evaluation(version, {"roc_auc": 0.6, "log_loss": 0.6})
    promotion.record(conn, name, evaluation, None, promotion.Decision(decision == "promoted", "test"),
                     (when.date(), when.date()), None, decided_at=when)
    if decision == "promoted" and applied:
        promotion.mark_applied(conn, name, version, when)


def moves(conn, name: str, version: str, *steps) -> None:
    from mlplatform.rollout import stages

    for stage, when in steps:
        stages.move(conn, name, version, stage, "test", "test", moved_at=when)


def record(version: str, day: dt.date, i: int, **more) -> dict:
    return {"ts": f"{day}T12:00:{i % 60:02d}.{i:06d}+00:00", "request_id": f"r{day}-{i}", "flight_id": f"f{i}",
            "model_name": "flight_delay", "model_version": version, "stage": "champion",
            "delay_probability": 0.25 + i / 1000, "latency_ms": 3.5, "batch_size": 1, "error": None,
            "trace_id": f"{i:032x}", "span_id": f"{i:016x}", "warnings": ["no_weather"] if i % 2 else [], **more}


def write_day(directory, day: dt.date, records: list[dict], mode: str = "w") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{day}.jsonl").open(mode) as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))


def parquet_records(path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def location(settings):
    """The code location, with the retention job and its schedule."""
    from mlplatform.definitions import build_defs

    return build_defs(settings)


def run_retention(defs, instance, dry_run: bool = False) -> dict:
    """``retention_job`` run in-process; its output's metadata."""
    result = defs.resolve_job_def("retention_job").execute_in_process(
        instance=instance, run_config={"ops": {"apply_retention": {"config": {"dry_run": dry_run}}}})
    assert result.success
    output = next(e for e in result.all_events if e.event_type_value == "STEP_OUTPUT")
    return {k: v.value for k, v in output.event_specific_data.metadata.items()}


def test_retention_removes_what_no_one_needs_and_keeps_everything_in_use(champion_home, champion_instance):
    from dagster import DagsterRunStatus, job, op

    from mlplatform.monitoring import profiles
    from mlplatform.resources import ProfileStore
    from mlplatform.retention import DELETED_TAG, inference_log_sql
    from mlplatform.rollout.stages import CANARY, REJECTED, ROLLED_BACK, SHADOW
    from mlplatform.training.tracking import CANARY_ALIAS, SHADOW_ALIAS, tracking_from

    settings = champion_home
    mlflow = tracking_from(settings)
    name, client = mlflow.registered_model, mlflow.client()
    # --- versions in every state (v1 is the world's champion) ---
    v = {n: register(mlflow, n) for n in range(2, 10)}
    conn = duckdb.connect(str(settings.warehouse))
    try:
        promoted(conn, name, v[3], ago(300))                       # champion two before: archived
        promoted(conn, name, v[2], ago(200))                       # the previous champion: rollback needs it
        promoted(conn, name, v[4], ago(71), applied=False)         # the gate passed it into the staged rollout,
        moves(conn, name, v[4], (SHADOW, ago(70)), (CANARY, ago(65)), (ROLLED_BACK, ago(60)))  # rolled back long ago
        promoted(conn, name, v[9], ago(100), applied=False)        # the gate approved it, champion_model not run yet
        promoted(conn, name, v[5], ago(60), decision="rejected")   # rejected by the gate long ago
        moves(conn, name, v[6], (SHADOW, ago(3)), (REJECTED, ago(1)))  # rejected yesterday: too recent
        moves(conn, name, v[7], (SHADOW, ago(10)), (CANARY, ago(5)))   # the canary now
        moves(conn, name, v[8], (SHADOW, ago(2)))                  # the shadow now
        history = conn.execute("SELECT * FROM monitoring.rollout_history ORDER BY move").fetchall()
        promotions = conn.execute("SELECT * FROM monitoring.model_promotions ORDER BY decided_at").fetchall()
    finally:
        conn.close()
    mlflow.set_alias(CANARY_ALIAS, v[7])
    mlflow.set_alias(SHADOW_ALIAS, v[8])
    uris = {n: client.get_model_version_download_uri(name, ver) for n, ver in [(1, "1"), *v.items()]}
    run_dirs = {n: client.get_run(client.get_model_version(name, ver).run_id).info.artifact_uri.removeprefix("file://")
                for n, ver in [(1, "1"), *v.items()]}
    # --- profiles: two old days, reference profiles of the champion, the archived and the previous ---
    store = ProfileStore(path=str(settings.profiles))
    newest = max(dt.date.fromisoformat(p.stem) for p in (settings.profiles / "daily").glob("*.bin"))
    old_day, recent_day = newest - dt.timedelta(days=100), newest - dt.timedelta(days=80)
    for day in (old_day, recent_day):
        shutil.copy(store.day(newest), store.day(day))
    for n in (2, 3):
        shutil.copy(store.reference(name, "1"), store.reference(name, v[n]))
    # --- the inference log: today, two finished days, two expired days (one compacted already) ---
    log_dir = settings.inference_log
    days = {k: TODAY - dt.timedelta(days=k) for k in (0, 1, 3, 40, 45)}
    written = {k: [record("1", day, i) for i in range(25)] for k, day in days.items()}
    written[3] = [{k: v for k, v in r.items() if k not in ("error", "trace_id")} for r in written[3]]  # fields vary
    written[1].append(record("7", days[1], 99, stage="canary", error="boom", extra={"nested": [1, 2]}))
    for k in (0, 1, 3, 40, 45):
        write_day(log_dir, days[k], written[k])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(written[45]), log_dir / f"{days[45]}.parquet")
    (log_dir / f"{days[45]}.jsonl").unlink()
    # --- runs: one with no asset event (finished), one not started ---
    @op
    def nothing():
        return None

    @job
    def no_assets():
        nothing()

    assert no_assets.execute_in_process(instance=champion_instance).success
    idle = champion_instance.create_run_for_job(no_assets)  # NOT_STARTED: never touched
    asset_runs = [r.dagster_run.run_id for r in champion_instance.get_run_records()]
    storage = settings.dagster_home / "storage"
    assert any((storage / run / "compute_logs").exists() for run in asset_runs)

    # --- the policy: the latest two champions kept, every finished run's logs expire ---
    defs = location(dataclasses.replace(settings, retention_keep_champions=2, retention_run_days=0))
    assert defs.resolve_schedule_def("retention_schedule").cron_schedule == settings.retention_cron
    # --- a dry run changes nothing ---
    before = sorted(str(p) for p in settings.home.rglob("*") if "dagster" not in p.parts)
    dry = run_retention(defs, champion_instance, dry_run=True)
    assert dry["dry_run"] is True and dry["model_artifacts_deleted"] == 3 and dry["inference_log_compacted"] == 2
    assert sorted(str(p) for p in settings.home.rglob("*") if "dagster" not in p.parts) == before

    metadata = run_retention(defs, champion_instance)

    # model artifacts: the archived champion, the rolled back and the gate's rejected version are gone
    assert metadata["model_artifacts_deleted"] == 3 and metadata["model_artifacts_bytes_freed"] > 0
    for n in (3, 4, 5):
        assert not any(_local_files(uris[n])) and not any(_local_files(run_dirs[n])), n
        assert client.get_model_version(name, v[n]).tags[DELETED_TAG]  # the registry row stays, tagged
    # ... and everything in use still loads: champion, previous champion, canary, shadow, the recent rejection
    for n in (1, 2, 6, 7, 8, 9):
        ver = "1" if n == 1 else v[n]
        model = mlflow.load_model(ver)
        assert hasattr(model, "predict_proba") and DELETED_TAG not in client.get_model_version(name, ver).tags
        assert any(_local_files(run_dirs[n]))
    from mlflow import pyfunc

    assert pyfunc.load_model(uris[7]) is not None  # the canary as the server's pyfunc reads it
    conn = duckdb.connect(str(settings.warehouse))
    try:  # the histories are untouched
        assert conn.execute("SELECT * FROM monitoring.rollout_history ORDER BY move").fetchall() == history
        assert conn.execute("SELECT * FROM monitoring.model_promotions ORDER BY decided_at").fetchall() == promotions
        logged = conn.execute("SELECT policy, item, action, dry_run FROM monitoring.retention_log").fetchall()
        kept = dict(conn.execute("SELECT item, reason FROM monitoring.retention_log WHERE action = 'kept' "
                                 "AND NOT dry_run").fetchall())
    finally:
        conn.close()
    assert {f"version {v[n]}" for n in (3, 4, 5)} == {i for p, i, a, d in logged
                                                     if p == "model_artifacts" and a == "deleted" and not d}
    assert "rollback" in kept[f"version {v[2]}"] and "canary" in kept[f"version {v[7]}"]
    assert "champion" in kept["version 1"] and "shadow" in kept[f"version {v[8]}"]
    assert "not applied" in kept[f"version {v[9]}"] and f"version {v[4]}" not in kept

    # profiles: the day past the policy and the archived version's reference; the champion's reference loads
    assert not store.day(old_day).exists() and store.day(recent_day).exists() and store.day(newest).exists()
    assert not store.reference(name, v[3]).exists() and store.reference(name, v[2]).exists()
    assert len(profiles.summary(profiles.load(store.reference(name, "1")))) > 0

    # the inference log: finished days are Parquet holding exactly the records; today stays JSON lines
    assert sorted(p.name for p in log_dir.iterdir()) == sorted(
        [f"{days[0]}.jsonl", f"{days[1]}.parquet", f"{days[3]}.parquet"])
    for k in (1, 3):
        assert _same(parquet_records(log_dir / f"{days[k]}.parquet"), written[k])
    assert metadata["inference_log_compacted"] == 2 and metadata["inference_log_deleted"] == 2
    query = inference_log_sql(log_dir, COLUMNS)
    with duckdb.connect() as con:
        counts = dict(con.execute(f"SELECT model_version, count(*) FROM ({query}) GROUP BY 1").fetchall())
        errors = con.execute(f"SELECT count(*) FROM ({query}) WHERE error IS NOT NULL").fetchone()[0]
    assert counts == {"1": 75, "7": 1} and errors == 1

    # runs: the run with no asset event is gone, the runs with asset events lost only their compute logs
    assert champion_instance.get_run_by_id(idle.run_id).status == DagsterRunStatus.NOT_STARTED
    remaining = {r.dagster_run.run_id for r in champion_instance.get_run_records()}
    assert len(remaining & set(asset_runs)) == len(asset_runs) - 1  # (no_assets' run was deleted)
    assert not any((storage / run / "compute_logs").exists() for run in asset_runs)
    assert metadata["run_logs_deleted"] >= len(asset_runs) - 1

    # --- re-running is safe: nothing more to do; a compaction cut short before the removal of the
    # JSON lines (the file is back, with a record appended since) is finished without doubling a record ---
    late = record("1", days[1], 500)
    write_day(log_dir, days[1], [*written[1], late])
    again = run_retention(defs, champion_instance)
    assert again["model_artifacts_deleted"] == 0 and again["daily_profiles_deleted"] == 0
    assert again["inference_log_compacted"] == 1 and again["inference_log_deleted"] == 0
    assert _same(parquet_records(log_dir / f"{days[1]}.parquet"), [*written[1], late])
    # ... and a late record of a compacted day (new JSON lines) is added to it
    later = record("7", days[1], 501, stage="canary")
    write_day(log_dir, days[1], [later])
    third = run_retention(defs, champion_instance)
    assert third["inference_log_compacted"] == 1 and third["model_artifacts_deleted"] == 0
    assert _same(parquet_records(log_dir / f"{days[1]}.parquet"), [*written[1], late, later])
    assert sorted(p.name for p in log_dir.iterdir()) == sorted(
        [f"{days[0]}.jsonl", f"{days[1]}.parquet", f"{days[3]}.parquet"])
    for n in (1, 2, 7, 8, 9):
        assert mlflow.load_model("1" if n == 1 else v[n]) is not None


def test_retention_on_a_new_home_finds_nothing_to_do(home, instance):
    """The first night, before any model, profile or request: the job runs and records nothing."""
    metadata = run_retention(location(home), instance)
    assert metadata["dry_run"] is False
    assert all(metadata[f"{policy}_deleted"] == 0 for policy in
               ("model_artifacts", "reference_profiles", "daily_profiles", "inference_log", "run_logs"))
    with duckdb.connect(str(home.warehouse)) as conn:
        assert conn.execute("SELECT count(*) FROM monitoring.retention_log").fetchone() == (0,)


def _local_files(uri: str):
    from pathlib import Path

    path = Path(uri.removeprefix("file://"))
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def _same(rows: list[dict], records: list[dict]) -> bool:
    """The Parquet rows are the JSON records: every field's value, whatever its type (a field a record
    lacks is null in the table)."""
    def canonical(row):
        return json.dumps({k: v for k, v in row.items() if v is not None}, sort_keys=True, default=str)

    return sorted(map(canonical, rows)) == sorted(map(canonical, records))


@pytest.mark.unit
def test_settings_read_the_retention_policy_from_the_environment():
    from mlplatform.retention import retention_policy_resource, retention_schedule
    from mlplatform.settings import Settings

    default = Settings.from_env({"MLPLATFORM_HOME": "/tmp/x"})
    assert (default.retention_model_days, default.retention_keep_champions, default.retention_run_days) == (30, 3, 30)
    settings = Settings.from_env({"MLPLATFORM_HOME": "/tmp/x", "MLPLATFORM_RETENTION_INFERENCE_LOG_DAYS": "7",
                                  "MLPLATFORM_RETENTION_CRON": "0 3 * * 0"})
    assert retention_policy_resource(settings).inference_log_days == 7
    assert retention_schedule(settings).cron_schedule == "0 3 * * 0"
    with pytest.raises(ValueError, match="MLPLATFORM_RETENTION_RUN_DAYS"):
        Settings.from_env({"MLPLATFORM_HOME": "/tmp/x", "MLPLATFORM_RETENTION_RUN_DAYS": "a week"})
