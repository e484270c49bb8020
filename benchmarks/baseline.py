"""The plain-script baseline: the main job's work by hand, with duckdb and scikit-learn only.

    python benchmarks/baseline.py --landing DIR --sql DIR --workdir DIR [--start D --end D]

Load the landing zone's daily CSV files and reference snapshots into DuckDB, build the same
feature table, train the same estimator on the same time-ordered split, and score every flight.
No Dagster, no dbt process, no contracts or quarantine, no checks, no MLflow, no whylogs.

"The same features" is meant literally: ``--sql`` is a folder of the dbt models' SQL as dbt
compiles it for the window (``compile_models`` below writes it, outside the timing), executed
here as plain ``CREATE TABLE ... AS`` statements in dependency order. So the baseline does the
same SQL work as the pipeline's dbt step, and the figure it gives is what the platform costs on
top: orchestration, the dbt process, ingestion's typing and rules, checks, tracking, profiles.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def compile_models(out: Path, start: dt.date, end: dt.date, warehouse: Path) -> list[str]:
    """Compile the dbt models (and the seed's path) that feed ``flight_features`` for the window
    into ``out``: one ``NN_schema.name.sql`` file per node, in dependency order. Runs dbt once,
    against an empty warehouse, so every incremental model compiles as its full SELECT."""
    import os
    import shutil
    import subprocess

    from mlplatform.settings import DBT_PROJECT_DIR, dbt_executable

    target = out / "dbt-target"
    env_vars = {"min_date": start.isoformat(), "max_date": end.isoformat()}
    env = {**os.environ, "MLPLATFORM_WAREHOUSE": str(warehouse), "DBT_TARGET_PATH": str(target)}
    subprocess.run(
        [dbt_executable(), "compile", "--quiet", "--select", "+flight_features", "--vars", json.dumps(env_vars),
         "--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(DBT_PROJECT_DIR), "--target-path", str(target)],
        check=True, env=env, cwd=DBT_PROJECT_DIR, stdout=subprocess.DEVNULL,
    )
    manifest = json.loads((target / "manifest.json").read_text())
    nodes = {k: n for k, n in manifest["nodes"].items() if n["resource_type"] in ("model", "seed")}

    def deps(key: str) -> list[str]:
        return nodes[key].get("depends_on", {}).get("nodes", [])

    wanted = set()
    stack = [k for k, n in nodes.items() if n["name"] == "flight_features"]
    while stack:
        key = stack.pop()
        if key in wanted or key not in nodes:
            continue
        wanted.add(key)
        stack.extend(deps(key))
    order: list[str] = []

    def visit(key: str) -> None:
        if key in order or key not in wanted:
            return
        for dep in deps(key):
            visit(dep)
        order.append(key)

    for key in sorted(wanted):
        visit(key)
    written = []
    for i, key in enumerate(order):
        node = nodes[key]
        name = f"{i:02d}_{node['schema']}.{node['name']}.sql"
        if node["resource_type"] == "seed":
            sql = f"SELECT * FROM read_csv('{DBT_PROJECT_DIR / node['original_file_path']}', header = true)"
        else:
            sql = node["compiled_code"]
        (out / name).write_text(sql)
        written.append(name)
    shutil.rmtree(target, ignore_errors=True)
    return written


def run(landing: Path, sql_dir: Path, workdir: Path, start: dt.date, end: dt.date) -> dict:
    import duckdb

    from mlplatform.ingest.contracts import DAILY, REFERENCE, TIMESTAMP
    from mlplatform.training import model as m

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    database = workdir / "warehouse.duckdb"  # the compiled SQL names the catalog "warehouse"
    database.unlink(missing_ok=True)
    conn = duckdb.connect(str(database))
    conn.execute("SET TimeZone = 'UTC'")

    # load: every daily file and reference snapshot, typed by the contracts' column types
    for contract in [*DAILY, *REFERENCE]:
        types = {c: ("TIMESTAMPTZ" if t == TIMESTAMP else t) for c, t in contract.columns.items()}
        select = ", ".join(
            f"timezone('UTC', \"{c}\") AS \"{c}\"" if t == TIMESTAMP else f'"{c}"' for c, t in contract.columns.items()
        )
        conn.execute("CREATE SCHEMA IF NOT EXISTS raw")
        if contract.partitioned:
            files = sorted((landing / contract.name).glob("*.csv"))
            files = [str(f) for f in files if start <= dt.date.fromisoformat(f.stem) <= end]
            conn.execute(
                f"CREATE TABLE raw.{contract.name} AS SELECT {select}, "
                "CAST(regexp_extract(filename, '(\\d{4}-\\d{2}-\\d{2})\\.csv$', 1) AS DATE) AS _partition_date, "
                "filename AS _source_file, 0::BIGINT AS _source_row, now()::TIMESTAMP AS _ingested_at "
                "FROM read_csv(?, columns = ?, header = true, nullstr = 'NA', filename = true)",
                [files, types],
            )
        else:
            conn.execute(
                f"CREATE TABLE raw.{contract.name} AS SELECT {select}, NULL::DATE AS _partition_date, "
                "'' AS _source_file, 0::BIGINT AS _source_row, now()::TIMESTAMP AS _ingested_at "
                "FROM read_csv(?, columns = ?, header = true, nullstr = 'NA')",
                [str(landing / "reference" / f"{contract.name}.csv"), types],
            )
    # the event stream's table, as the pipeline's raw_flight_events leaves it without a stream
    # (the full-year figure runs `mlplatform run --no-stream`; the stream has figures of its own)
    from mlplatform.stream.ingest import events_ddl

    conn.execute(events_ddl(conn))
    timings["load"] = time.perf_counter() - t0

    # features: the dbt models' compiled SQL, in order
    t = time.perf_counter()
    for path in sorted(sql_dir.glob("*.sql")):
        schema, name = path.stem.split("_", 1)[1].split(".")
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        conn.execute(f"CREATE TABLE {schema}.{name} AS {path.read_text()}")
    timings["features"] = time.perf_counter() - t

    # train: the same estimator, windows and time-ordered split as flight_delay_model (train on every
    # labelled day before the last 92, validate on its last 28 days, refit), then evaluate on the 92
    t = time.perf_counter()
    first, last = conn.execute(
        f"SELECT min(flight_date), max(flight_date) FROM {m.FEATURE_TABLE} WHERE {m.LABEL} IS NOT NULL"
    ).fetchone()
    span = (last - first).days + 1
    eval_start = last - dt.timedelta(days=(92 if span >= 2 * 92 else max(1, span // 4)) - 1)
    frame = m.load_frame(conn, first, eval_start - dt.timedelta(days=1), max_rows=m.MAX_TRAIN_ROWS)
    validation_days = min(28, max(1, (eval_start - first).days // 4))
    estimator, validation, _, _, _ = m.fit(frame, m.Hyperparameters(), validation_days)
    held_out = m.load_frame(conn, eval_start, last)
    evaluation = m.metrics(held_out[m.LABEL], estimator.predict_proba(m.model_input(held_out))[:, 1])
    timings["train"] = time.perf_counter() - t

    # score every flight of the window
    t = time.perf_counter()
    everything = m.load_frame(conn, start, end, labelled=False)
    scores = everything[["flight_id", "flight_date"]].assign(
        delay_probability=estimator.predict_proba(m.model_input(everything))[:, 1]
    )
    conn.execute("CREATE SCHEMA IF NOT EXISTS predictions")
    conn.register("scores", scores)
    conn.execute("CREATE TABLE predictions.flight_delay AS SELECT * FROM scores")
    timings["score"] = time.perf_counter() - t
    counts = {
        "raw_flights": conn.execute("SELECT count(*) FROM raw.flights").fetchone()[0],
        "features": conn.execute("SELECT count(*) FROM features.flight_features").fetchone()[0],
        "predictions": conn.execute("SELECT count(*) FROM predictions.flight_delay").fetchone()[0],
    }
    conn.close()
    timings["total"] = time.perf_counter() - t0
    return {"seconds": timings, "rows": counts, "validation_roc_auc": validation["roc_auc"],
            "evaluation_roc_auc": evaluation["roc_auc"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--landing", type=Path, required=True)
    parser.add_argument("--sql", type=Path, required=True, help="compiled model SQL (see compile_models)")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--start", type=dt.date.fromisoformat, default=dt.date(2013, 1, 1))
    parser.add_argument("--end", type=dt.date.fromisoformat, default=dt.date(2013, 12, 31))
    args = parser.parse_args()
    print(json.dumps(run(args.landing, args.sql, args.workdir, args.start, args.end)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
