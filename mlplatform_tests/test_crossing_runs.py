"""Two training runs started at the same moment, in two processes, on one instance, one MLflow
registry and one warehouse (what two clicks on "Materialize all" do): each run evaluates and
records the version it registered itself, never the other's, whatever the `challenger` alias
says when its evaluation runs; the `champion` alias ends on the version whose promotion was
applied last."""

from __future__ import annotations

import os
import subprocess
import sys

import duckdb
from dagster import AssetRecordsFilter, DagsterInstance

from mlplatform import keys
from mlplatform.home import init_home
from mlplatform.training.tracking import CHAMPION, tracking_from
from mlplatform_tests.conftest import CHAMPION_TRAINING

LANE = "system"

TRAIN = """
import json, sys
from dagster import DagsterInstance
from mlplatform.definitions import load_defs
from mlplatform.settings import Settings
settings = Settings.from_env()
config = {"ops": {"flight_delay_model": {"config": json.loads(sys.argv[1])}}}
with DagsterInstance.from_config(str(settings.dagster_home)) as instance:
    result = load_defs(settings).resolve_job_def("training_job").execute_in_process(
        instance=instance, run_config=config, raise_on_error=False)
print(result.run_id)
sys.exit(0 if result.success else 1)
"""


def materialized(instance, key, run_id) -> dict | None:
    """The metadata of ``key``'s materialization in run ``run_id``."""
    for record in instance.fetch_materializations(AssetRecordsFilter(asset_key=key), limit=100).records:
        if record.run_id == run_id:
            return {k: v.value for k, v in record.asset_materialization.metadata.items()}
    return None


def test_two_training_runs_started_together_never_cross(features_home, tmp_path):
    import json

    home = init_home(features_home)  # one instance (SQLite, with the warehouse pool) for both processes
    configs = [CHAMPION_TRAINING, {**CHAMPION_TRAINING, "max_iter": 30, "learning_rate": 0.1}]
    env = {**os.environ, **home.as_env()}
    processes = [subprocess.Popen([sys.executable, "-c", TRAIN, json.dumps(config)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=(tmp_path / f"run{i}.log").open("w"))
                 for i, config in enumerate(configs)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [(tmp_path / f"run{i}.log").read_text()[-3000:] for i in (0, 1)]
    run_ids = [out.strip().splitlines()[-1] for out in outputs]

    with DagsterInstance.from_config(str(home.dagster_home)) as instance:
        registered = {}
        for run_id in run_ids:
            trained = materialized(instance, keys.FLIGHT_DELAY_MODEL, run_id)
            evaluated = materialized(instance, keys.MODEL_EVALUATION, run_id)
            assert trained and evaluated, run_id
            # the run evaluated the version it trained, whatever the alias said at the time
            assert evaluated["challenger_version"] == trained["model_version"], (run_id, evaluated, trained)
            approved = materialized(instance, keys.APPROVED_CHALLENGER, run_id)
            promoted = materialized(instance, keys.CHAMPION_MODEL, run_id)
            if evaluated["decision"] == "PROMOTED":
                assert approved["model_version"] == promoted["model_version"] == trained["model_version"]
            else:  # rejected, or into the shadow (the other run's version was champion by then)
                assert evaluated["decision"] in ("REJECTED", "SHADOW") and approved is None and promoted is None
            registered[run_id] = trained["model_version"]
    assert len(set(registered.values())) == 2

    with duckdb.connect(str(home.warehouse), read_only=True) as conn:
        decisions = conn.execute("SELECT dagster_run_id, challenger_version, decision, applied_at "
                                 "FROM monitoring.model_promotions").fetchall()
    # every decision record names the version its own run trained
    assert {run_id: version for run_id, version, _, _ in decisions} == registered
    applied = sorted((at, version) for _, version, decision, at in decisions if decision == "promoted" and at)
    assert applied, decisions
    champion = tracking_from(home).version_by_alias(CHAMPION)
    assert str(champion.version) == applied[-1][1], (decisions, champion.version)
