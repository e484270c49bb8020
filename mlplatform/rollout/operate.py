"""The staged rollout from the command line (``mlplatform rollout ...``): plain functions over the
warehouse's history, the registry and the code location's approval job."""

from __future__ import annotations


from mlplatform.rollout import stages
from mlplatform.settings import Settings
from mlplatform.training.tracking import CANARY_SHARE_TAG, tracking_from
from mlplatform.warehouse import connect, has_table


def status(settings: Settings) -> str:
    """The versions' stages, the moves and the latest verdicts, as text."""
    if not settings.has_warehouse:
        return "no warehouse yet"
    lines = []
    mlflow = tracking_from(settings)
    with connect(settings.database, read_only=True) as conn:
        for move in stages.history(conn, mlflow.registered_model):
            lines.append(f"{move.moved_at:%Y-%m-%d %H:%M:%S}  v{move.version:<4} {move.previous or '-':>11} -> "
                         f"{move.stage:<12} by {move.decided_by}: {move.reason}")
        verdicts = _latest_verdicts(conn, mlflow.registered_model)
    share = _share(mlflow)
    head = [f"canary share: {share if share is not None else 'default (0.1)'}", "", "moves:"]
    tail = ["", "latest verdicts:"] + [f"  v{v} ({stage}) on {day}: {action}: {reason}"
                                       for v, stage, day, action, reason in verdicts]
    return "\n".join(head + ([f"  {line}" for line in lines] or ["  none yet"]) + tail)


def _latest_verdicts(conn, model_name: str) -> list[tuple]:
    if not has_table(conn, "monitoring", "online_evaluation"):
        return []
    return conn.execute("SELECT version, stage, evaluation_date, action, reason FROM monitoring.online_evaluation "
                        "WHERE model_name = ? QUALIFY row_number() OVER (PARTITION BY version ORDER BY "
                        "evaluation_date DESC) = 1 ORDER BY version", [model_name]).fetchall()


def _share(mlflow) -> float | None:
    try:
        value = mlflow.client().get_registered_model(mlflow.registered_model).tags.get(CANARY_SHARE_TAG)
    except Exception:  # noqa: BLE001 - no model yet
        return None
    return float(value) if value else None


def set_share(settings: Settings, share: float) -> str:
    if not 0.0 <= share <= 1.0:
        raise SystemExit(f"the canary share must be within 0..1, not {share}")
    mlflow = tracking_from(settings)
    mlflow.client().set_registered_model_tag(mlflow.registered_model, CANARY_SHARE_TAG, str(share))
    return f"the canary answers {share:.0%} of flights (servers pick it up at their next refresh)"


def operator_move(settings: Settings, version: str, stage: str, by: str, reason: str) -> str:
    from mlplatform.rollout.assets import apply_move

    with connect(settings.database) as conn:
        try:
            moved = apply_move(conn, tracking_from(settings), str(version), stage, by, reason)
        except stages.InvalidMove as exc:
            raise SystemExit(str(exc)) from None
    return f"version {moved.version}: {moved.previous or 'nowhere'} -> {moved.stage} (by {by})"


def approve_in_dagster(settings: Settings, approver: str, reason: str, version: str = "") -> str:
    """Run ``approve_canary_job`` in this process on the home's instance: the approval is a run in
    the UI like one launched there."""
    from dagster import DagsterInstance

    from mlplatform.definitions import APPROVE_CANARY_JOB, load_defs

    from mlplatform.pipeline import QUIET
    from mlplatform.rollout.assets import NotAwaiting, awaiting

    if not approver.strip() or not reason.strip():
        raise SystemExit("not approved: give the approver's name (--by) and a reason (--reason)")
    with connect(settings.database, read_only=True) as conn:  # refused here, before a run is launched
        try:
            awaiting(conn, tracking_from(settings).registered_model, version)
        except NotAwaiting as exc:
            raise SystemExit(f"not approved: {exc.description}") from None
    config = {**QUIET, "ops": {"approve_canary": {"config": {"approver": approver, "reason": reason,
                                                             "version": version}}}}
    with DagsterInstance.from_config(str(settings.dagster_home)) as instance:
        result = load_defs(settings).resolve_job_def(APPROVE_CANARY_JOB).execute_in_process(
            instance=instance, run_config=config, raise_on_error=False)
    if not result.success:
        failure = next((e.event_specific_data.error.message for e in result.all_events
                        if e.event_type_value == "STEP_FAILURE"), "see the run in the UI")
        reason = failure.strip().splitlines()[-1] if failure else ""
        raise SystemExit(f"not approved: {reason.split('Failure: ', 1)[-1]}")
    return f"approved by {approver} (run {result.run_id})"



