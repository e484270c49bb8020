"""Training, evaluation and promotion as assets: thin glue over ``model`` and ``promotion``.

    features/flight_features -> flight_delay_model -> model_evaluation -> champion_model

``flight_delay_model`` trains on every labelled day before the evaluation window, logs the run
to MLflow, registers a new version of ``flight_delay`` and points the ``challenger`` alias at
it. ``model_evaluation`` scores challenger and champion on the evaluation window and records
the decision; its blocking check ``promotion_gate`` passes only when the rule says promote,
and only then does ``champion_model`` run and move the ``champion`` alias.
"""

import datetime as dt
import json
from typing import TYPE_CHECKING

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)
from dagster_duckdb import DuckDBResource
from pydantic import Field

from mlplatform.resources import WarehouseReader
from mlplatform.training import model as m
from mlplatform.training import promotion
from mlplatform.training.tracking import CHALLENGER, CHAMPION, MlflowTracking, git_state

if TYPE_CHECKING:
    import pandas as pd

FEATURES_KEY = AssetKey(["features", "flight_features"])
OWNERS = ["team:ml-platform"]
RANGE_TAG = "mlplatform.partition_range"


class TrainingConfig(Config):
    eval_days: int = Field(92, description="Length of the evaluation window: the last labelled days.")
    eval_end: str | None = Field(None, description="Last day of the evaluation window (default: last labelled day).")
    train_start: str | None = Field(None, description="First training day (default: the first day there is).")
    validation_days: int = Field(
        28, description="Last days of the training window used for validation (at most a quarter of it)."
    )
    threshold: float = Field(0.5, description="Decision threshold for precision/recall.")
    max_train_rows: int = Field(
        m.MAX_TRAIN_ROWS, description="Train on a deterministic sample of about this many flights when the "
        "training window has more (memory and time stop growing with the data)."
    )
    # hyperparameters; their defaults are the model's (one place: model.Hyperparameters)
    learning_rate: float = m.Hyperparameters.learning_rate
    max_iter: int = m.Hyperparameters.max_iter
    max_leaf_nodes: int = m.Hyperparameters.max_leaf_nodes
    min_samples_leaf: int = m.Hyperparameters.min_samples_leaf
    l2_regularization: float = m.Hyperparameters.l2_regularization
    random_state: int = m.Hyperparameters.random_state

    def hyperparameters(self) -> m.Hyperparameters:
        return m.Hyperparameters(
            learning_rate=self.learning_rate, max_iter=self.max_iter, max_leaf_nodes=self.max_leaf_nodes,
            min_samples_leaf=self.min_samples_leaf, l2_regularization=self.l2_regularization,
            random_state=self.random_state,
        )


def windows(conn, config: TrainingConfig) -> tuple[tuple[dt.date, dt.date], tuple[dt.date, dt.date]]:
    """(training window, evaluation window). The evaluation window is the last ``eval_days``
    labelled days, or the last quarter of them when there are fewer than twice as many."""
    first, last = conn.execute(
        f"SELECT min(flight_date), max(flight_date) FROM {m.FEATURE_TABLE} WHERE {m.LABEL} IS NOT NULL"
    ).fetchone()
    if first is None:
        raise Failure("features.flight_features has no labelled rows: materialize the daily assets first")
    eval_end = dt.date.fromisoformat(config.eval_end) if config.eval_end else last
    span = (eval_end - first).days + 1
    eval_days = config.eval_days if span >= 2 * config.eval_days else max(1, span // 4)
    eval_start = eval_end - dt.timedelta(days=eval_days - 1)
    train_start = dt.date.fromisoformat(config.train_start) if config.train_start else first
    return (train_start, eval_start - dt.timedelta(days=1)), (eval_start, eval_end)


def _markdown(series: "pd.Series", label: str) -> str:
    return "\n".join([f"| feature | {label} |", "|---|---|", *(f"| {k} | {v:.4f} |" for k, v in series.items())])


@asset(
    group_name="training",
    deps=[FEATURES_KEY],
    kinds={"scikit-learn", "mlflow"},
    owners=OWNERS,
    description="A HistGradientBoosting classifier of is_delayed, trained on every labelled day before the "
    "evaluation window; logged to MLflow and registered as a new version of `flight_delay` (alias challenger).",
)
def flight_delay_model(
    context: AssetExecutionContext, config: TrainingConfig, warehouse_reader: WarehouseReader, mlflow: MlflowTracking
) -> MaterializeResult:
    import mlflow as mlflow_api
    from mlflow import sklearn as mlflow_sklearn
    from mlflow.models import infer_signature

    with warehouse_reader.get_connection() as conn:
        (train_start, train_end), (eval_start, eval_end) = windows(conn, config)
        available = m.count_rows(conn, train_start, train_end)
        frame = m.load_frame(conn, train_start, train_end, max_rows=config.max_train_rows, available=available)
    params = config.hyperparameters()
    validation_days = min(config.validation_days, max(1, ((train_end - train_start).days + 1) // 4))
    estimator, validation, valid, importance = m.fit(frame, params, validation_days, config.threshold)
    data_version = m.content_hash(frame)
    commit, dirty = git_state()
    tags = {
        "dagster.run_id": context.run.run_id,
        "dagster.asset": context.asset_key.to_user_string(),
        RANGE_TAG: f"{train_start}..{train_end}",
        "git.commit": commit,
        "git.dirty": str(dirty).lower(),
        "data.version": data_version,
    }
    with mlflow.start_run(run_name=f"train {train_start}..{train_end}", tags=tags) as run:
        mlflow_api.log_params({
            **params.as_dict(), "train_start": str(train_start), "train_end": str(train_end),
            "eval_start": str(eval_start), "eval_end": str(eval_end), "validation_days": validation_days,
            "threshold": config.threshold, "train_rows": len(frame), "train_rows_available": available,
            "max_train_rows": config.max_train_rows, "n_features": len(m.FEATURES),
        })
        mlflow_api.log_metrics({f"val_{k}": v for k, v in validation.items()})
        mlflow_api.log_metric("train_positive_rate", float(frame[m.LABEL].mean()))
        mlflow_api.log_dict({"categorical": m.CATEGORICAL, "numeric": m.NUMERIC, "label": m.LABEL}, "features.json")
        mlflow_api.log_dict(importance.round(6).to_dict(), "feature_importance.json")
        example = m.model_input(valid.head(5))
        info = mlflow_sklearn.log_model(
            estimator,
            name="model",
            signature=infer_signature(example, estimator.predict_proba(example)),
            input_example=example,
            registered_model_name=mlflow.registered_model,
            pyfunc_predict_fn="predict_proba",
            await_registration_for=0,
            skops_trusted_types=m.SKOPS_TRUSTED_TYPES,
            pip_requirements=m.pip_requirements(),
        )
        run_id = run.info.run_id
    version = str(info.registered_model_version)
    client = mlflow.client()
    for key, value in {**tags, "eval_start": str(eval_start), "eval_end": str(eval_end)}.items():
        client.set_model_version_tag(mlflow.registered_model, version, key, value)
    mlflow.set_alias(CHALLENGER, version)
    context.log.info("registered %s version %s (validation ROC AUC %.4f)", mlflow.registered_model, version,
                     validation["roc_auc"])
    url = mlflow.run_url(run_id)
    return MaterializeResult(
        metadata={
            "model_version": version,
            "mlflow_run_id": run_id,
            **({"mlflow_run": MetadataValue.url(url)} if url else {}),
            "train_window": f"{train_start}..{train_end}",
            "eval_window": f"{eval_start}..{eval_end}",
            "train_rows": len(frame),
            "train_rows_available": available,
            "data_version": data_version,
            **{f"val_{k}": MetadataValue.float(round(v, 5)) for k, v in validation.items() if k != "rows"},
            "feature_importance": MetadataValue.md(_markdown(importance.head(15), "permutation AUC drop")),
        }
    )


class PromotionConfig(Config):
    min_auc_gain: float = Field(0.002, description="ROC AUC the challenger must gain over the champion.")
    segment_tolerance: float = Field(0.02, description="Largest ROC AUC loss allowed in any carrier.")
    min_segment_rows: int = Field(500, description="Carriers with fewer evaluation flights are not judged.")
    baseline_auc_margin: float = Field(0.05, description="First model: ROC AUC above 0.5 by this much.")

    def rule(self) -> promotion.PromotionRule:
        return promotion.PromotionRule(self.min_auc_gain, self.segment_tolerance, self.min_segment_rows,
                                       self.baseline_auc_margin)


def evaluation(version: str, scored: "pd.DataFrame", min_rows: int, threshold: float) -> promotion.Evaluation:
    """A version's metrics and per-carrier AUC from ``m.score_window``'s frame."""
    probability = scored[version].to_numpy()
    return promotion.Evaluation(
        version,
        m.metrics(scored[m.LABEL], probability, threshold),
        m.segment_auc(scored, probability, "carrier", min_rows),
    )


@asset(
    group_name="training",
    deps=[flight_delay_model],
    kinds={"mlflow", "duckdb"},
    owners=OWNERS,
    description="Scores the challenger and the champion on the same held-out window, applies the promotion "
    "rule and records the decision in monitoring.model_promotions.",
    check_specs=[AssetCheckSpec(
        "promotion_gate", asset="model_evaluation", blocking=True,
        description="The challenger beats the champion (or, first, a trivial baseline) with no carrier regressing.",
    )],
    pool="warehouse_writer",
)
def model_evaluation(
    context: AssetExecutionContext, config: PromotionConfig, warehouse: DuckDBResource, mlflow: MlflowTracking
) -> MaterializeResult:
    challenger = mlflow.version_by_alias(CHALLENGER)
    if challenger is None:
        raise Failure("no model version has the alias 'challenger': materialize flight_delay_model first")
    champion = mlflow.version_by_alias(CHAMPION)
    eval_start = dt.date.fromisoformat(challenger.tags["eval_start"])
    eval_end = dt.date.fromisoformat(challenger.tags["eval_end"])
    if champion is not None and champion.version != challenger.version:
        # both are judged out of sample: after the champion's training window too
        champion_train_end = dt.date.fromisoformat(champion.tags[RANGE_TAG].split("..")[1])
        eval_start = max(eval_start, champion_train_end + dt.timedelta(days=1))
        if eval_start > eval_end:
            raise Failure(
                f"no held-out days for both models: the champion (version {champion.version}) trained up to "
                f"{champion_train_end}, the evaluation window ends {eval_end}; land later days or set eval_end"
            )
    threshold = float(mlflow.client().get_run(challenger.run_id).data.params.get("threshold", 0.5))
    versions = [challenger.version]
    if champion is not None and champion.version != challenger.version:
        versions.append(champion.version)
    estimators = {version: mlflow.load_model(version) for version in versions}
    with warehouse.get_connection() as conn:
        scored = m.score_window(conn, estimators, eval_start, eval_end)
    if scored.empty:
        raise Failure(f"no labelled flights in the evaluation window {eval_start}..{eval_end}")
    rule = config.rule()
    challenger_eval = evaluation(challenger.version, scored, rule.min_segment_rows, threshold)
    champion_eval = None
    if len(versions) > 1:
        champion_eval = evaluation(champion.version, scored, rule.min_segment_rows, threshold)
    if champion is not None and champion.version == challenger.version:
        decision = promotion.Decision(True, f"version {challenger.version} is already the champion")
    else:
        train_rate = mlflow.client().get_run(challenger.run_id).data.metrics["train_positive_rate"]
        base = promotion.baseline(train_rate, float(scored[m.LABEL].mean()))
        decision = promotion.decide(challenger_eval, champion_eval, base, rule)
        with warehouse.get_connection() as conn:
            promotion.record(conn, mlflow.registered_model, challenger_eval, champion_eval, decision,
                             (eval_start, eval_end), context.run.run_id)
    context.log.info("challenger %s: %s", challenger.version, decision.reason)
    metadata = {
        "challenger_version": challenger.version,
        "champion_version": champion.version if champion else "none",
        "decision": "promote" if decision.promote else "reject",
        "reason": decision.reason,
        "eval_window": f"{eval_start}..{eval_end}",
        "eval_rows": len(scored),
        "challenger_roc_auc": MetadataValue.float(round(challenger_eval.metrics["roc_auc"], 5)),
        "challenger_log_loss": MetadataValue.float(round(challenger_eval.metrics["log_loss"], 5)),
    }
    if champion_eval:
        metadata["champion_roc_auc"] = MetadataValue.float(round(champion_eval.metrics["roc_auc"], 5))
        metadata["champion_log_loss"] = MetadataValue.float(round(champion_eval.metrics["log_loss"], 5))
    champion_segments = champion_eval.segments if champion_eval else {}
    metadata["carrier_roc_auc"] = MetadataValue.md("\n".join(
        ["| carrier | challenger | champion |", "|---|---|---|"]
        + [f"| {c} | {a:.4f} | {champion_segments.get(c, float('nan')):.4f} |"
           for c, a in sorted(challenger_eval.segments.items())]
    ))
    return MaterializeResult(
        metadata=metadata,
        check_results=[AssetCheckResult(
            check_name="promotion_gate", passed=decision.promote, description=decision.reason,
            metadata={"details": MetadataValue.json(json.loads(json.dumps(
                {"challenger": challenger_eval.metrics, "champion": champion_eval.metrics if champion_eval else None},
                default=float)))},
        )],
    )


@asset(
    group_name="training",
    deps=[model_evaluation],
    kinds={"mlflow"},
    owners=OWNERS,
    description="The current champion: moves the `champion` alias to a challenger the gate approved.",
    pool="warehouse_writer",
)
def champion_model(context: AssetExecutionContext, warehouse: DuckDBResource, mlflow: MlflowTracking) -> MaterializeResult:
    challenger = mlflow.version_by_alias(CHALLENGER)
    champion = mlflow.version_by_alias(CHAMPION)
    if challenger is None:
        raise Failure("no model version has the alias 'challenger'")
    with warehouse.get_connection() as conn:
        decision = promotion.latest_decision(conn, mlflow.registered_model, str(challenger.version))
        if champion is None or champion.version != challenger.version:
            if decision is None or decision[0] != "promoted":
                raise Failure(f"version {challenger.version} was not approved by the promotion gate ({decision})")
            mlflow.set_alias(CHAMPION, challenger.version)
            context.log.info("champion is now version %s", challenger.version)
        if decision is not None and decision[0] == "promoted" and decision[2] is None:
            # also repairs a promotion whose alias moved but whose record was not updated
            promotion.mark_applied(conn, mlflow.registered_model, str(challenger.version))
    version = mlflow.version_by_alias(CHAMPION)
    run = mlflow.client().get_run(version.run_id)
    return MaterializeResult(metadata={
        "model_version": version.version,
        "mlflow_run_id": version.run_id,
        "val_roc_auc": MetadataValue.float(round(run.data.metrics.get("val_roc_auc", float("nan")), 5)),
        "train_window": version.tags.get(RANGE_TAG, ""),
    })


training_assets = [flight_delay_model, model_evaluation, champion_model]
