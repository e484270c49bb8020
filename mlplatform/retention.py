"""Retention: what grows without bound gets a policy, applied by ``retention_job`` on a schedule.

Four policies, plain functions over the stores, each returning the ``Action`` it took on each item
(``retention_job`` applies them all, records them in ``monitoring.retention_log`` and shows counts
and bytes freed per policy in its output's metadata; ``dry_run`` says what it would do and does
nothing):

- **model artifacts** (``MLPLATFORM_RETENTION_MODEL_DAYS``, ``_KEEP_CHAMPIONS``): a version that
  was rejected (by the gate or in the rollout), rolled back, or retired as champion more than
  ``model_days`` ago loses its MLflow artifacts (the run's and the logged model's) and its
  reference profile. Its registry row and its run (parameters, metrics, tags) stay: the promotion
  and rollout histories name it; the version and the run get the tag ``mlplatform.artifacts_deleted``.
  Never touched (``protected_versions``): a version an alias points at (champion, challenger,
  shadow, canary), a version in the shadow, the canary or champion, the champion an open
  evaluation of the shadow or canary compares with, a version the gate promoted but whose
  promotion is not applied yet, and the latest ``keep_champions`` champions of the promotion and
  rollout histories (a rollback needs the previous champion). A version with no decision recorded
  (just trained) is kept too.
- **daily profiles** (``_PROFILE_DAYS``): whylogs profiles of days more than ``profile_days``
  before the newest day profiled (the data's clock: a replayed 2013 keeps its profiles). The
  drift reports made from them are in the warehouse; reference profiles go with their version's
  artifacts only.
- **inference log** (``_INFERENCE_LOG_DAYS``): every finished day's ``<date>.jsonl`` (not today's:
  the server appends to it) becomes ``<date>.parquet`` (written to a temporary file, renamed, then
  the JSON lines removed; the Parquet file knows which JSON lines it holds, so a late record or a
  compaction cut short never loses or doubles one), and days older than ``inference_log_days``
  (UTC) are deleted. ``inference_log_sql`` reads both kinds of day.
- **run logs** (``_RUN_DAYS``): Dagster runs finished more than ``run_days`` ago lose their compute
  logs; a run that recorded no asset event (a materialization, an observation, a check) is deleted
  altogether. Runs with asset events stay: their events are the asset catalog's history, and the
  platform reads the latest ones (the champion's version is ``champion_model``'s materialization).
  A run not finished is never touched.
"""

import datetime as dt
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from dagster import (
    Config,
    ConfigurableResource,
    DefaultScheduleStatus,
    Definitions,
    MetadataValue,
    OpExecutionContext,
    Output,
    ScheduleDefinition,
    job,
    op,
)
from dagster_duckdb import DuckDBResource
from pydantic import Field

from mlplatform import keys
from mlplatform.resources import ProfileStore
from mlplatform.settings import Settings
from mlplatform.training.tracking import MlflowTracking

MODEL_ARTIFACTS, REFERENCE_PROFILES, DAILY_PROFILES, INFERENCE_LOG, RUN_LOGS = (
    "model_artifacts", "reference_profiles", "daily_profiles", "inference_log", "run_logs")
POLICIES = (MODEL_ARTIFACTS, REFERENCE_PROFILES, DAILY_PROFILES, INFERENCE_LOG, RUN_LOGS)
DELETED, COMPACTED, KEPT = "deleted", "compacted", "kept"
DELETED_TAG = "mlplatform.artifacts_deleted"  # on a model version and its run: when its artifacts went
JSONL, PARQUET = ".jsonl", ".parquet"  # an inference log day as the server writes it, and compacted
RETENTION_JOB = "retention_job"

LOG_DDL = """
CREATE SCHEMA IF NOT EXISTS monitoring;
CREATE TABLE IF NOT EXISTS monitoring.retention_log (
    applied_at      TIMESTAMP NOT NULL,
    dagster_run_id  VARCHAR,
    policy          VARCHAR NOT NULL,   -- model_artifacts | reference_profiles | daily_profiles |
                                        -- inference_log | run_logs
    item            VARCHAR NOT NULL,   -- a model version, a day, a run id
    action          VARCHAR NOT NULL,   -- deleted | compacted | kept (protected model versions)
    bytes           BIGINT,             -- freed (compacted: the JSON lines' bytes less the Parquet's)
    reason          VARCHAR NOT NULL,
    dry_run         BOOLEAN NOT NULL    -- true: what the policy would have done
);
"""


@dataclass(frozen=True)
class Action:
    policy: str
    item: str
    action: str
    bytes: int
    reason: str


def size_of(path: Path) -> int:
    """Bytes of a file or of everything under a directory (0 when it is not there)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _local(uri: str) -> Path | None:
    from urllib.parse import unquote, urlparse

    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    return Path(uri) if uri.startswith("/") else None


# --- model versions ---------------------------------------------------------------------------

def protected_versions(conn, mlflow, keep_champions: int) -> dict[str, str]:
    """{version: why it must keep everything} of the registered model (see the module's docstring)."""
    from mlplatform.rollout import stages
    from mlplatform.training import promotion
    from mlplatform.warehouse import has_table

    name = mlflow.registered_model
    keep: dict[str, list[str]] = {}

    def protect(version, reason: str) -> None:
        keep.setdefault(str(version), []).append(reason)

    for alias, version in (mlflow.client().get_registered_model(name).aliases or {}).items():
        protect(version, f"the alias {alias} points at it")
    for stage in (stages.CHAMPION, stages.CANARY, stages.SHADOW):
        for version in stages.versions_in(conn, name, stage):
            protect(version, f"in the {stage}")
    candidates = list(stages.candidates(conn, name).values())
    if candidates and has_table(conn, "monitoring", "online_evaluation"):
        for (version,) in conn.execute(
                "SELECT DISTINCT champion_version FROM monitoring.online_evaluation WHERE model_name = ? AND "
                "version IN (SELECT unnest(?::VARCHAR[]))", [name, candidates]).fetchall():
            protect(version, "the champion an open evaluation compares with")
    champions: list[tuple] = []  # (since, version) of every champion either history knows
    if has_table(conn, "monitoring", "model_promotions"):
        champions += conn.execute("SELECT champion_from, version FROM monitoring.champion_history "
                                  "WHERE model_name = ?", [name]).fetchall()
        for (version,) in conn.execute(
                "SELECT challenger_version FROM monitoring.model_promotions WHERE model_name = ? AND "
                "decision = 'promoted' AND applied_at IS NULL", [name]).fetchall():
            # (a staged rollout takes the version into the shadow instead: its stages say the rest)
            latest = promotion.latest_decision(conn, name, version)
            if latest and latest.promoted and stages.current_stage(conn, name, version) is None:
                protect(version, "promoted by the gate, the promotion not applied yet")
    if has_table(conn, "monitoring", "rollout_history"):
        champions += conn.execute("SELECT moved_at, version FROM monitoring.rollout_history WHERE model_name = ? "
                                  "AND stage = 'champion'", [name]).fetchall()
    latest_first = list(dict.fromkeys(str(v) for _, v in sorted(champions, key=lambda c: c[0], reverse=True)))
    for rank, version in enumerate(latest_first[:keep_champions]):
        protect(version, "the current champion" if rank == 0 else
                f"champion {rank} before the current one (kept for a rollback: keep_champions={keep_champions})")
    return {version: "; ".join(reasons) for version, reasons in keep.items()}


def left_service(conn, model_name: str) -> dict[str, tuple[dt.datetime, str]]:
    """{version: (when it left, how)} of the versions that were rejected, rolled back or replaced
    as champion: by their rollout stage, else the gate's latest decision, else the promotion
    history's end of their time as champion."""
    from mlplatform.rollout import stages
    from mlplatform.warehouse import has_table

    left: dict[str, tuple[dt.datetime, str]] = {}
    if has_table(conn, "monitoring", "rollout_history"):
        for version, stage, since in conn.execute(
                "SELECT version, stage, since FROM monitoring.rollout_stages WHERE model_name = ?",
                [model_name]).fetchall():
            if stage in (stages.REJECTED, stages.ROLLED_BACK, stages.RETIRED):
                left[str(version)] = (since, stage)
    if has_table(conn, "monitoring", "model_promotions"):
        for version, decision, decided_at in conn.execute(
                "SELECT challenger_version, arg_max(decision, decided_at), max(decided_at) FROM "
                "monitoring.model_promotions WHERE model_name = ? GROUP BY challenger_version",
                [model_name]).fetchall():
            if decision == "rejected":
                left.setdefault(str(version), (decided_at, "rejected by the gate"))
        for version, until in conn.execute(
                "SELECT version, max(champion_until) FROM monitoring.champion_history WHERE model_name = ? "
                "GROUP BY version HAVING count(*) = count(champion_until)", [model_name]).fetchall():
            left.setdefault(str(version), (until, "replaced as champion"))
    return left


def expire_model_artifacts(conn, mlflow, profile_store, now: dt.datetime, days: int, keep_champions: int,
                           dry_run: bool = False) -> list[Action]:
    """Delete the artifacts (and the reference profile) of the versions that left service more than
    ``days`` before ``now``; a ``kept`` action for every protected version."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client, name = mlflow.client(), mlflow.registered_model
    if not _registered(client, name):
        return []
    protected = protected_versions(conn, mlflow, keep_champions)
    actions = [Action(MODEL_ARTIFACTS, f"version {v}", KEPT, 0, why) for v, why in sorted(protected.items())]
    left = left_service(conn, name)
    versions = {str(mv.version): mv for mv in client.search_model_versions(f"name = '{name}'")}
    in_use = set()  # what the protected versions' artifacts are: never deleted, even if shared
    for version in protected:
        if version in versions:
            in_use |= set(_artifact_uris(client, versions[version]))
    cutoff = now - dt.timedelta(days=days)
    for version, mv in sorted(versions.items(), key=lambda kv: int(kv[0])):
        if version in protected or DELETED_TAG in (mv.tags or {}) or version not in left:
            continue
        when, how = left[version]
        if when is None or when > cutoff:
            continue
        freed = 0
        for uri in _artifact_uris(client, mv):
            if any(uri.startswith(used) or used.startswith(uri) for used in in_use):
                continue  # (the same directory as, or one holding or inside, a protected version's)
            path = _local(uri)
            freed += size_of(path) if path else 0
            if not dry_run:
                get_artifact_repository(uri, tracking_uri=mlflow.tracking_uri).delete_artifacts()
        reference = Path(profile_store.reference(name, version))
        if reference.exists():
            actions.append(Action(REFERENCE_PROFILES, f"version {version}", DELETED, size_of(reference),
                                  f"its version's artifacts are deleted ({how})"))
            if not dry_run:
                reference.unlink()
        if not dry_run:
            stamp = now.isoformat(timespec="seconds")
            client.set_model_version_tag(name, version, DELETED_TAG, stamp)
            client.set_tag(mv.run_id, DELETED_TAG, stamp)
        actions.append(Action(MODEL_ARTIFACTS, f"version {version}", DELETED, freed,
                              f"{how} on {when:%Y-%m-%d}, more than {days} days ago"))
    return actions


def _registered(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # no model trained yet (an unreachable store is an error)
            return False
        raise


def _artifact_uris(client, mv) -> list[str]:
    """Where a version's artifacts are: its logged model's and its run's."""
    uris = [client.get_model_version_download_uri(mv.name, mv.version)]
    if mv.run_id:
        uris.append(client.get_run(mv.run_id).info.artifact_uri)
    return uris


# --- profiles ---------------------------------------------------------------------------------

def expire_daily_profiles(profile_store, days: int, dry_run: bool = False) -> list[Action]:
    """Delete the daily profiles of days more than ``days`` before the newest one profiled."""
    directory = Path(profile_store.day(dt.date.min)).parent
    found = {}
    for path in directory.glob("*.bin") if directory.exists() else []:
        try:
            found[dt.date.fromisoformat(path.stem)] = path
        except ValueError:
            continue  # not a day's profile
    if not found:
        return []
    return _delete_days_before(DAILY_PROFILES, found, max(found) - dt.timedelta(days=days),
                               f"more than {days} days before the newest profile ({max(found)})", dry_run)


def _delete_days_before(policy: str, files: dict, cutoff: dt.date, reason: str, dry_run: bool) -> list[Action]:
    """Delete the files of ``{day: path}`` whose day is before ``cutoff`` (unless a dry run)."""
    actions = []
    for day, path in sorted(files.items()):
        if day < cutoff:
            actions.append(Action(policy, str(day), DELETED, size_of(path), f"{reason} ({path.name})"))
            if not dry_run:
                path.unlink()
    return actions


# --- the inference log ------------------------------------------------------------------------

def _days(directory: Path, suffix: str) -> dict[dt.date, Path]:
    found = {}
    for path in Path(directory).glob(f"*{suffix}") if Path(directory).exists() else []:
        try:
            found[dt.date.fromisoformat(path.name[:-len(suffix)])] = path
        except ValueError:
            continue
    return found


SOURCE_BYTES, SOURCE_SHA256 = b"mlplatform.source_bytes", b"mlplatform.source_sha256"  # a Parquet day's


def compact_inference_log(directory: Path, today: dt.date, dry_run: bool = False,
                          skip: set[str] = frozenset()) -> list[Action]:
    """Every finished day's JSON lines (before ``today``, UTC) into ``<date>.parquet``: the records as
    they are (every field, whatever the writer adds). The Parquet file says which JSON lines it
    holds (their length and SHA-256, in its metadata), so a day compacted before takes only what
    was appended since, and a compaction cut short between the rename and the removal is finished
    without doubling a record. Days in ``skip`` (expired: a dry run has not deleted them) are left."""
    actions = []
    for day, source in sorted(_days(directory, JSONL).items()):
        if day >= today or str(day) in skip:
            continue
        target = source.with_name(f"{day.isoformat()}{PARQUET}")
        if dry_run:
            actions.append(Action(INFERENCE_LOG, str(day), COMPACTED, 0, "a finished day (dry run: not compacted)"))
            continue
        before = size_of(source) + size_of(target)
        records = _compact_day(source, target)
        actions.append(Action(INFERENCE_LOG, str(day), COMPACTED, before - size_of(source) - size_of(target),
                              f"a finished day: {records} record(s) into Parquet"))
    return actions


def _compact_day(source: Path, target: Path) -> int:
    """``source``'s records not in ``target`` yet appended to it (atomically: a temporary file
    renamed), then ``source`` removed unless it grew meanwhile. Returns how many were added."""
    import hashlib

    import duckdb
    import pyarrow.parquet as pq

    size = source.stat().st_size
    done = 0  # bytes of source the Parquet file holds already
    if target.exists():
        metadata = pq.read_schema(target).metadata or {}
        held = int(metadata.get(SOURCE_BYTES, b"0"))
        if 0 < held <= size and _sha256(source, held) == metadata.get(SOURCE_SHA256, b"").decode():
            done = held
    digest = hashlib.sha256()
    part = target.with_name(f".{source.name}.{uuid.uuid4().hex}.part")
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with source.open("rb") as fh, part.open("wb") as out:  # exactly ``size`` bytes: what we hash is what we read
            for offset in range(0, size, 1 << 20):
                chunk = fh.read(min(1 << 20, size - offset))
                digest.update(chunk)
                if offset + len(chunk) > done:
                    out.write(chunk[max(0, done - offset):])
        added = 0
        if part.stat().st_size:
            con = duckdb.connect()
            try:
                # the records' own types, read from all of them (strings stay strings: read_json
                # would turn a timestamp's text into a TIMESTAMP without its offset)
                lines = "read_json_objects(?, format = 'newline_delimited')"
                structure = con.execute(f"SELECT json_group_structure(json) FROM {lines}", [str(part)]).fetchone()[0]
                read = f"SELECT unnest(json_transform(json, ?)) FROM {lines}"
                added = con.execute(f"SELECT count(*) FROM {lines}", [str(part)]).fetchone()[0]
                if target.exists():
                    table = con.execute(f"SELECT * FROM read_parquet(?) UNION ALL BY NAME {read}",
                                        [str(target), structure, str(part)]).to_arrow_table()
                else:
                    table = con.execute(read, [structure, str(part)]).to_arrow_table()
            finally:
                con.close()
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), SOURCE_BYTES: str(size).encode(),
                                                   SOURCE_SHA256: digest.hexdigest().encode()})
            pq.write_table(table, temporary)
            os.replace(temporary, target)  # atomic: readers see the day before or after, never half of it
        if source.stat().st_size == size:  # (a record appended meanwhile: the next run takes it)
            source.unlink()
        return added
    finally:
        part.unlink(missing_ok=True)
        temporary.unlink(missing_ok=True)


def _sha256(path: Path, size: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for offset in range(0, size, 1 << 20):
            digest.update(fh.read(min(1 << 20, size - offset)))
    return digest.hexdigest()


def expire_inference_log(directory: Path, today: dt.date, days: int, dry_run: bool = False) -> list[Action]:
    """Delete the inference log's days (JSON lines and Parquet) older than ``days`` before ``today``."""
    cutoff = today - dt.timedelta(days=days)
    return [action for suffix in (JSONL, PARQUET)
            for action in _delete_days_before(INFERENCE_LOG, _days(directory, suffix), cutoff,
                                              f"older than {days} days", dry_run)]


def inference_log_sql(directory: Path, columns: dict[str, str]) -> str | None:
    """A SELECT of the inference log's records (the days still in JSON lines and the compacted
    ones), ``columns`` {name: DuckDB type} cast alike, NULL where no record of a day had the field
    (e.g. ``error``); None when there is no log. File patterns are SQL literals (a view takes no
    parameters)."""
    import pyarrow.parquet as pq

    from mlplatform.sql import sql_literal

    directory = Path(directory).resolve()
    parts = []
    if _days(directory, JSONL):
        struct = "{" + ", ".join(f"{name}: '{kind}'" for name, kind in columns.items()) + "}"
        parts.append(f"SELECT {', '.join(columns)} FROM read_json({sql_literal(directory / ('*' + JSONL))}, "
                     f"format = 'newline_delimited', columns = {struct})")
    compacted = _days(directory, PARQUET)
    if compacted:
        present = set().union(*(pq.read_schema(path).names for path in compacted.values()))
        casts = ", ".join(f"{name if name in present else 'NULL'}::{kind} AS {name}" for name, kind in columns.items())
        parts.append(f"SELECT {casts} FROM read_parquet({sql_literal(directory / ('*' + PARQUET))}, "
                     "union_by_name = true)")
    return " UNION ALL ".join(parts) or None


# --- run logs ---------------------------------------------------------------------------------

def expire_runs(instance, now: dt.datetime, days: int, dry_run: bool = False) -> list[Action]:
    """Compute logs of the runs finished more than ``days`` before ``now``; the run itself too when
    it recorded no asset event. A run not finished is never touched."""
    from dagster import DagsterEventType, DagsterRunStatus, RunsFilter

    finished = [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
    asset_events = {DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_OBSERVATION,
                    DagsterEventType.ASSET_CHECK_EVALUATION}
    cutoff = now - dt.timedelta(days=days)
    manager = instance.compute_log_manager
    base = (manager.inst_data.config_dict.get("base_dir") if manager.inst_data else None)
    actions = []
    for record in instance.get_run_records(RunsFilter(statuses=finished, updated_before=cutoff), ascending=True):
        run = record.dagster_run
        if run.status not in finished:  # (asked again: never a run in progress)
            continue
        logs = Path(base) / run.run_id if base else None
        freed = size_of(logs) if logs else 0
        has_assets = bool(instance.get_records_for_run(run.run_id, of_type=asset_events, limit=1).records)
        if has_assets and freed == 0:
            continue  # done before
        if not dry_run:
            manager.delete_logs(prefix=[run.run_id])
            if not has_assets:
                instance.delete_run(run.run_id)
        actions.append(Action(RUN_LOGS, run.run_id, DELETED, freed,
                              f"{run.job_name}, {run.status.value} before {cutoff:%Y-%m-%d %H:%M}: "
                              + ("compute logs only (its asset events are the catalog's history)" if has_assets
                                 else "the run, its events and compute logs")))
    return actions


# --- the record -------------------------------------------------------------------------------

def record(conn, actions: list[Action], applied_at: dt.datetime, run_id: str | None, dry_run: bool) -> None:
    """The actions as rows of ``monitoring.retention_log``, in one transaction."""
    from mlplatform.warehouse import create_tables, in_one_transaction

    create_tables(conn, LOG_DDL)
    in_one_transaction(conn, [("INSERT INTO monitoring.retention_log VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               [applied_at, run_id, a.policy, a.item, a.action, a.bytes, a.reason, dry_run])
                              for a in actions])


def summary(actions: list[Action], dry_run: bool) -> dict:
    """The job's output metadata: per policy, what it did and the bytes freed; the kept versions."""
    metadata: dict = {"dry_run": dry_run}
    for policy in POLICIES:
        mine = [a for a in actions if a.policy == policy]
        for action in (DELETED, COMPACTED) if policy == INFERENCE_LOG else (DELETED,):
            metadata[f"{policy}_{action}"] = sum(a.action == action for a in mine)
        metadata[f"{policy}_bytes_freed"] = MetadataValue.int(sum(a.bytes for a in mine if a.action != KEPT))
    rows = [a for a in actions if a.action != COMPACTED]
    if rows:
        metadata["actions"] = MetadataValue.md("\n".join(
            ["| policy | item | action | bytes | why |", "|---|---|---|---|---|"]
            + [f"| {a.policy} | {a.item} | {a.action} | {a.bytes} | {a.reason} |" for a in rows[:200]]))
    return metadata


# --- Dagster ----------------------------------------------------------------------------------

class RetentionPolicy(ConfigurableResource):
    """How long things are kept (``MLPLATFORM_RETENTION_*``; the defaults are ``Settings``')."""

    model_days: int = Field(description="A rejected, rolled back or retired version's artifacts are deleted this "
                            "many days after it left.")
    keep_champions: int = Field(description="The latest champions (the current one too) whose artifacts stay "
                                "whatever their age: a rollback needs the previous champion.")
    profile_days: int = Field(description="Daily profiles older than this many days before the newest one are "
                              "deleted.")
    inference_log_days: int = Field(description="Inference log days older than this are deleted (finished days "
                                    "are compacted into Parquet).")
    run_days: int = Field(description="Finished runs older than this lose their compute logs (and runs with no "
                          "asset event are deleted).")
    inference_log: str = Field(description="The server's inference log directory.")


def retention_policy_resource(settings: Settings) -> RetentionPolicy:
    return RetentionPolicy(model_days=settings.retention_model_days, keep_champions=settings.retention_keep_champions,
                           profile_days=settings.retention_profile_days,
                           inference_log_days=settings.retention_inference_log_days,
                           run_days=settings.retention_run_days, inference_log=str(settings.inference_log))


class RetentionRun(Config):
    dry_run: bool = Field(False, description="Say what would be deleted or compacted, and change nothing.")


@op(description="Apply the retention policies: model artifacts of rejected and retired versions, daily profiles, "
    "the inference log (compacted into Parquet by day, then deleted), old runs' logs. Never what a champion, a "
    "canary, a shadow, an open evaluation or the promotion history needs.",
    pool=keys.WAREHOUSE_POOL)
def apply_retention(context: OpExecutionContext, config: RetentionRun, retention: RetentionPolicy,
                    warehouse: DuckDBResource, mlflow: MlflowTracking, profile_store: ProfileStore) -> Output:
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    actions: list[Action] = []
    with warehouse.get_connection() as conn:
        actions += expire_model_artifacts(conn, mlflow, profile_store, now, retention.model_days,
                                          retention.keep_champions, config.dry_run)
        actions += expire_daily_profiles(profile_store, retention.profile_days, config.dry_run)
        log_dir = Path(retention.inference_log)
        expired = expire_inference_log(log_dir, now.date(), retention.inference_log_days, config.dry_run)
        actions += expired + compact_inference_log(log_dir, now.date(), config.dry_run,
                                                   skip={a.item for a in expired})
        actions += expire_runs(context.instance, now, retention.run_days, config.dry_run)
        record(conn, actions, now, context.run.run_id, config.dry_run)
    for a in actions:
        if a.action != KEPT:
            context.log.info("%s%s %s: %s (%d bytes): %s", "(dry run) " if config.dry_run else "", a.policy, a.item,
                             a.action, a.bytes, a.reason)
    return Output(None, metadata=summary(actions, config.dry_run))


@job(name=RETENTION_JOB, description="Apply the retention policies (MLPLATFORM_RETENTION_*); results in "
     "monitoring.retention_log and the step's output metadata. Launch with dry_run: true to see what it would do.")
def retention_job():
    apply_retention()


def retention_schedule(settings: Settings) -> ScheduleDefinition:
    return ScheduleDefinition(name="retention_schedule", job=retention_job, cron_schedule=settings.retention_cron,
                              execution_timezone="UTC", default_status=DefaultScheduleStatus.RUNNING,
                              description="Every night: the retention policies (MLPLATFORM_RETENTION_*).")


def retention_defs(settings: Settings) -> Definitions:
    """The job, its schedule and the policy's resource, to merge into the code location (it uses the
    location's ``warehouse``, ``mlflow`` and ``profile_store``)."""
    return Definitions(jobs=[retention_job], schedules=[retention_schedule(settings)],
                       resources={"retention": retention_policy_resource(settings)})
