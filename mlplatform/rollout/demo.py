"""The staged rollout, end to end on real days (``mlplatform rollout-demo``).

1. replay and build 2013-01-01..02-06; a weak first champion (trained on 300 flights);
2. a real challenger passes the offline gate: into the shadow;
3. days' labels land (predictions, then monitoring, as automation runs them): a day in the
   shadow not worse than the champion puts it in the canary (a stable share of flights); two days
   better with p < the level promote it;
4. a deliberately worse version (one tree on 200 flights), rejected by the gate, is put in the
   canary by an operator; its first labelled day rolls it back.

Every run is recorded in DAGSTER_HOME: the moves and verdicts show in the UI on
``monitoring/online_evaluation`` (metadata per day, its plots) and in ``monitoring.rollout_history``.
The demo's policy needs fewer labels than the default (1,000 flights over 2 days instead of
2,000 over 3: it has a few February days to judge on).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sys
from typing import TextIO

from dagster import DagsterInstance

from mlplatform.loop import LOG, run_logged
from mlplatform.settings import Settings

D = dt.date
# the days; the challenger's daily AUC is above the weak champion's on them (on 2013-01-31 it is
# not, and its shadow would rightly be rejected: README, Staged rollout)
DAYS = [D(2013, 2, 1), D(2013, 2, 2), D(2013, 2, 3)]
WORSE_DAY = D(2013, 2, 4)
TRAINING = {"eval_days": 7, "eval_end": "2013-02-06", "validation_days": 7, "learning_rate": 0.05,
            "min_samples_leaf": 100, "max_iter": 60}
POLICY = (("min_days", 2), ("min_labelled_flights", 1000))


def run_demo(settings: Settings, out: TextIO = sys.stdout) -> bool:
    import duckdb

    from mlplatform.definitions import load_defs
    from mlplatform.ingest.landing import replay
    from mlplatform.rollout import operate

    settings = dataclasses.replace(settings, rollout_overrides=(*settings.rollout_overrides, *POLICY))
    defs = load_defs(settings)
    instance = DagsterInstance.from_config(str(settings.dagster_home))
    LOG[:] = [settings.home / "logs" / f"rollout-demo-{dt.datetime.now():%Y%m%dT%H%M%S}.log"]
    LOG[0].parent.mkdir(parents=True, exist_ok=True)
    print(f"dbt and step output: {LOG[0]}", file=out)

    def train(**config):
        run_config = {"ops": {"flight_delay_model": {"config": {**TRAINING, **config}}}}
        result = run_logged(defs, instance, "training_job", out, run_config=run_config)
        evaluation = result.asset_materializations_for_node("model_evaluation")[0].metadata
        print(f"    version {evaluation['challenger_version'].value}: {evaluation['decision'].value}: "
              f"{evaluation['reason'].value}", file=out)
        return evaluation["challenger_version"].value

    def land(day):
        run_logged(defs, instance, "predictions_job", out, day, day)
        run_logged(defs, instance, "monitoring_job", out, day, day)
        with duckdb.connect(str(settings.warehouse), read_only=True) as conn:
            for version, stage, action, reason in conn.execute(
                    "SELECT version, stage, action, reason FROM monitoring.online_evaluation WHERE evaluation_date = ?",
                    [day]).fetchall():
                print(f"    {day}: version {version} ({stage}): {action}: {reason}", file=out)

    start, end = D(2013, 1, 1), D(2013, 2, 6)
    print(f"1. replay and build {start}..{end}; a weak first champion", file=out)
    replay(settings.landing, start, end)
    run_logged(defs, instance, "reference_job", out)
    run_logged(defs, instance, "daily_job", out, start, end)
    train(max_train_rows=300, max_iter=20)
    print("2. a challenger through the offline gate", file=out)
    train()
    print("3. labels land, day by day", file=out)
    for day in DAYS:
        land(day)
    print("4. a worse version, put in the canary by an operator", file=out)
    worse = train(max_train_rows=200, max_iter=1, random_state=7)
    for stage in ("shadow", "canary"):
        print("    " + operate.operator_move(settings, worse, stage, "rollout-demo",
                                             "show what a worse canary does"), file=out)
    land(WORSE_DAY)
    print("\n" + operate.status(settings), file=out)
    print("\nIn the UI (make ui): monitoring/online_evaluation (its metadata per day; Metadata -> Plots -> Events draws them over the days), the "
          "runs of monitoring_job, and the champion_model materialization the promotion recorded.", file=out)
    return True
