"""Training, evaluation and promotion as assets: thin glue over ``model`` and ``promotion``.

    features/flight_features -> flight_delay_model -> model_evaluation -> approved_challenger
                                                                       -> champion_model

``flight_delay_model`` trains on every labelled day before the evaluation window, logs the run
to MLflow, registers a new version of ``flight_delay`` and points the ``challenger`` alias at
it. ``model_evaluation`` scores that version (read from its upstream's materialization, never
from the alias: ``mlplatform.lineage``) and the champion on the evaluation window and records
the decision. A rejection is a decision, not a failure: the run succeeds, ``model_evaluation``
says REJECTED and why (its check ``promotion_gate`` warns), and ``approved_challenger`` is not
materialized, so ``champion_model`` is skipped. An approval materializes
``approved_challenger``, and ``champion_model`` moves the ``champion`` alias to that version,
as the run's last side effect.
"""

import datetime as dt
import json
from typing import TYPE_CHECKING

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetSpec,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
    multi_asset,
)
from dagster_duckdb import DuckDBResource
from pydantic import Field

from mlplatform import keys
from mlplatform.lineage import upstream_metadata
from mlplatform.monitoring.costs import measured
from mlplatform.partitions import Window
from mlplatform.resources import WarehouseReader
from mlplatform.rollout.assets import RolloutPolicy, apply_move
from mlplatform.rollout.stages import CHAMPION as CHAMPION_STAGE
from mlplatform.rollout.stages import SHADOW
from mlplatform.training import model as m
from mlplatform.training import promotion
from mlplatform.training.tracking import (
    CHALLENGER,
    CHAMPION,
    TRAIN_END_TAG,
    TRAIN_START_TAG,
    MlflowTracking,
    TrainedModel,
    git_state,
    training_window,
)

if TYPE_CHECKING:
    import pandas as pd

OWNERS = ["team:ml-platform"]
GROUP = "training"
# Fewer labelled days cannot make a first model worth keeping: three weeks to train (the last of
# them to validate) and a week to evaluate.
MIN_LABELLED_DAYS = 28


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
    max_iter: int = Field(m.Hyperparameters.max_iter, description="Most boosting iterations; training keeps the "
                          "number with the lowest validation log loss.")
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


def windows(conn, config: TrainingConfig) -> tuple[Window, Window]:
    """(training window, evaluation window). The evaluation window is the last ``eval_days``
    labelled days, or the last quarter of them when there are fewer than twice as many. Fewer
    than ``MIN_LABELLED_DAYS`` labelled days are refused with what to backfill."""
    first, last, days = conn.execute(
        f"SELECT min(flight_date), max(flight_date), count(DISTINCT flight_date) FROM {m.FEATURE_TABLE} "
        f"WHERE {m.LABEL} IS NOT NULL"
    ).fetchone()
    if first is None:
        raise Failure("features.flight_features has no labelled rows: materialize the reference assets, then "
                      f"backfill daily_job over at least {MIN_LABELLED_DAYS} days (README, Quick start)")
    eval_end = dt.date.fromisoformat(config.eval_end) if config.eval_end else last
    span = (eval_end - first).days + 1
    if days < MIN_LABELLED_DAYS or span < MIN_LABELLED_DAYS:
        raise Failure(
            f"too little history to train: features.flight_features has {days} labelled day(s) ({first}..{last})"
            f"{f', {span} up to the evaluation end {eval_end}' if config.eval_end else ''}; training needs at least "
            f"{MIN_LABELLED_DAYS} (three weeks to train and validate, one to evaluate): backfill daily_job from "
            f"{first} to {first + dt.timedelta(days=MIN_LABELLED_DAYS - 1)} or later (README, Quick start)"
        )
    eval_days = config.eval_days if span >= 2 * config.eval_days else max(1, span // 4)
    eval_start = eval_end - dt.timedelta(days=eval_days - 1)
    train_start = dt.date.fromisoformat(config.train_start) if config.train_start else first
    return Window(train_start, eval_start - dt.timedelta(days=1)), Window(eval_start, eval_end)


def _markdown(series: "pd.Series", label: str) -> str:
    return "\n".join([f"| feature | {label} |", "|---|---|", *(f"| {k} | {v:.4f} |" for k, v in series.items())])


@asset(
    key=keys.FLIGHT_DELAY_MODEL,
    group_name=GROUP,
    deps=[keys.FEATURES],
    kinds={"scikit-learn", "mlflow"},
    owners=OWNERS,
    description="A HistGradientBoosting classifier of is_delayed, trained on every labelled day before the "
    "evaluation window; logged to MLflow and registered as a new version of `flight_delay` (alias challenger).",
)
@measured
def flight_delay_model(
    context: AssetExecutionContext, config: TrainingConfig, warehouse_reader: WarehouseReader, mlflow: MlflowTracking
) -> MaterializeResult:
    import mlflow as mlflow_api
    from mlflow import sklearn as mlflow_sklearn
    from mlflow.models import infer_signature

    with warehouse_reader.get_connection() as conn:
        train, evaluation = windows(conn, config)
        available = m.count_rows(conn, train.start, train.end)
        frame = m.load_frame(conn, train.start, train.end, max_rows=config.max_train_rows, available=available)
    validation_days = min(config.validation_days, max(1, ((train.end - train.start).days + 1) // 4))
    estimator, validation, valid, importance, params = m.fit(frame, config.hyperparameters(), validation_days,
                                                             config.threshold)
    data_version = m.content_hash(frame)
    commit, dirty = git_state()
    tags = {
        "dagster.run_id": context.run.run_id,
        "dagster.asset": context.asset_key.to_user_string(),
        TRAIN_START_TAG: str(train.start),
        TRAIN_END_TAG: str(train.end),
        "git.commit": commit,
        "git.dirty": str(dirty).lower(),
        "data.version": data_version,
    }
    with mlflow.start_run(run_name=f"train {train}", tags=tags) as run:
        mlflow_api.log_params({
            **params.as_dict(), "max_iter_allowed": config.max_iter,
            "train_start": str(train.start), "train_end": str(train.end),
            "eval_start": str(evaluation.start), "eval_end": str(evaluation.end), "validation_days": validation_days,
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
    trained = TrainedModel(str(info.registered_model_version), run_id, train, evaluation)
    client = mlflow.client()
    for key, value in tags.items():
        client.set_model_version_tag(mlflow.registered_model, trained.version, key, value)
    mlflow.set_alias(CHALLENGER, trained.version)  # for people and serving; the graph passes the version on
    context.log.info("registered %s version %s (validation ROC AUC %.4f, %d boosting iterations)",
                     mlflow.registered_model, trained.version, validation["roc_auc"], params.max_iter)
    return MaterializeResult(
        metadata={
            **trained.metadata(),
            **mlflow.run_link(run_id),
            "train_rows": len(frame),
            "train_rows_available": available,
            "boosting_iterations": params.max_iter,
            "data_version": data_version,
            **{f"val_{k}": MetadataValue.float(round(v, 5)) for k, v in validation.items() if k != "rows"},
            "feature_importance": MetadataValue.md(_markdown(importance.head(15), "permutation AUC drop")),
        }
    )


class PromotionConfig(Config):
    # the defaults are the rule's (one place: promotion.PromotionRule)
    min_auc_gain: float = Field(promotion.PromotionRule.min_auc_gain,
                                description="ROC AUC the challenger must gain over the champion.")
    segment_tolerance: float = Field(promotion.PromotionRule.segment_tolerance,
                                     description="Largest ROC AUC loss allowed in any carrier.")
    min_segment_rows: int = Field(promotion.PromotionRule.min_segment_rows,
                                  description="Carriers with fewer evaluation flights are not judged.")
    baseline_auc_margin: float = Field(promotion.PromotionRule.baseline_auc_margin,
                                       description="First model: ROC AUC above 0.5 by this much.")

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


@multi_asset(
    name="model_evaluation",
    specs=[
        AssetSpec(keys.MODEL_EVALUATION, group_name=GROUP, deps=[keys.FLIGHT_DELAY_MODEL], kinds={"mlflow", "duckdb"},
                  owners=OWNERS, description="Scores the challenger this run trained (or the latest one) and the "
                  "champion on the same held-out window, applies the promotion rule and records the decision, "
                  "PROMOTED or REJECTED with its reason, in monitoring.model_promotions."),
        AssetSpec(keys.APPROVED_CHALLENGER, group_name=GROUP, deps=[keys.MODEL_EVALUATION], skippable=True,
                  kinds={"mlflow"}, owners=OWNERS, description="The challenger version the promotion gate approved. "
                  "Not materialized when the gate rejects it: champion_model is then skipped."),
    ],
    check_specs=[AssetCheckSpec(
        "promotion_gate", asset=keys.MODEL_EVALUATION,
        description="The challenger beats the champion (or, first, a trivial baseline) with no carrier regressing; "
        "a rejection warns (it is a decision, not a failure).",
    )],
    pool=keys.WAREHOUSE_POOL,
)
@measured
def model_evaluation(context: AssetExecutionContext, config: PromotionConfig, warehouse: DuckDBResource,
                     mlflow: MlflowTracking, rollout: RolloutPolicy):
    challenger = TrainedModel.from_metadata(upstream_metadata(
        context, keys.FLIGHT_DELAY_MODEL, "no trained model yet: materialize flight_delay_model first"))
    champion = mlflow.version_by_alias(CHAMPION)
    if champion is not None and str(champion.version) == challenger.version:
        champion = None  # (re-evaluating the champion itself: it is judged against the baseline)
    evaluated = challenger.evaluation
    if champion is not None:
        # both are judged out of sample: after the champion's training window too
        champion_window = training_window(champion)
        if champion_window is None:
            raise Failure(f"champion version {champion.version} has no training window tags ({TRAIN_START_TAG}): "
                          "it was not registered by flight_delay_model; promote a version trained by training_job")
        evaluated = Window(max(evaluated.start, champion_window.end + dt.timedelta(days=1)), evaluated.end)
        if evaluated.start > evaluated.end:
            raise Failure(
                f"no held-out days for both models: the champion (version {champion.version}) trained up to "
                f"{champion_window.end}, the evaluation window ends {evaluated.end}; land later days or set eval_end"
            )
    run = mlflow.client().get_run(challenger.run_id)
    threshold = float(run.data.params.get("threshold", 0.5))
    versions = [challenger.version] + ([str(champion.version)] if champion is not None else [])
    estimators = {version: mlflow.load_model(version) for version in versions}
    with warehouse.get_connection() as conn:
        scored = m.score_window(conn, estimators, evaluated.start, evaluated.end)
    if scored.empty:
        raise Failure(f"no labelled flights in the evaluation window {evaluated}")
    rule = config.rule()
    challenger_eval = evaluation(challenger.version, scored, rule.min_segment_rows, threshold)
    champion_eval = evaluation(str(champion.version), scored, rule.min_segment_rows, threshold) if champion else None
    base = promotion.baseline(run.data.metrics["train_positive_rate"], float(scored[m.LABEL].mean()))
    decision = promotion.decide(challenger_eval, champion_eval, base, rule)
    # a champion there already and a staged rollout: the version enters the shadow, not the traffic
    to_shadow = decision.promote and champion is not None and rollout.staged
    with warehouse.get_connection() as conn:
        promotion.record(conn, mlflow.registered_model, challenger_eval, champion_eval, decision, evaluated,
                         context.run.run_id)
        if to_shadow:
            apply_move(conn, mlflow, challenger.version, SHADOW, "gate", decision.reason,
                       {"challenger": challenger_eval.metrics, "champion": champion_eval.metrics},
                       context.run.run_id)
    verdict = ("SHADOW" if to_shadow else "PROMOTED") if decision.promote else "REJECTED"
    context.log.info("challenger %s: %s: %s", challenger.version, verdict, decision.reason)
    metadata = {
        "decision": verdict,
        "reason": decision.reason,
        "challenger_version": challenger.version,
        "champion_version": str(champion.version) if champion else "none",
        "evaluated_window": MetadataValue.json(evaluated.as_json()),
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
    yield MaterializeResult(
        asset_key=keys.MODEL_EVALUATION,
        metadata=metadata,
        check_results=[AssetCheckResult(
            check_name="promotion_gate", asset_key=keys.MODEL_EVALUATION, passed=decision.promote,
            severity=AssetCheckSeverity.WARN, description=f"{verdict}: {decision.reason}",
            metadata={"details": MetadataValue.json(json.loads(json.dumps(
                {"challenger": challenger_eval.metrics, "champion": champion_eval.metrics if champion_eval else None},
                default=float)))},
        )],
    )
    if decision.promote and not to_shadow:
        yield MaterializeResult(asset_key=keys.APPROVED_CHALLENGER,
                                metadata={**challenger.metadata(), "reason": decision.reason})


@asset(
    key=keys.CHAMPION_MODEL,
    group_name=GROUP,
    deps=[keys.APPROVED_CHALLENGER],
    kinds={"mlflow"},
    owners=OWNERS,
    description="The current champion: moves the `champion` alias to the version the gate approved in this run "
    "(or most recently). Skipped when the gate rejects the challenger.",
    pool=keys.WAREHOUSE_POOL,
)
@measured
def champion_model(context: AssetExecutionContext, warehouse: DuckDBResource, mlflow: MlflowTracking) -> MaterializeResult:
    approved = TrainedModel.from_metadata(upstream_metadata(
        context, keys.APPROVED_CHALLENGER, "no challenger was approved yet: materialize the training group"))
    with warehouse.get_connection() as conn:
        recorded = promotion.latest_decision(conn, mlflow.registered_model, approved.version)
        if recorded is None or not recorded.promoted:
            raise Failure(f"version {approved.version} is not approved: its latest decision is {recorded}")
        # the rollout history first, then the alias (the last side effect: serving follows it)
        apply_move(conn, mlflow, approved.version, CHAMPION_STAGE, "gate", f"offline gate: {recorded.reason}",
                   run_id=context.run.run_id, skip_stages=True)
    context.log.info("champion is now version %s", approved.version)
    run = mlflow.client().get_run(approved.run_id)
    return MaterializeResult(metadata={
        **approved.metadata(),
        **mlflow.run_link(approved.run_id),
        "val_roc_auc": MetadataValue.float(round(run.data.metrics.get("val_roc_auc", float("nan")), 5)),
    })


training_assets = [flight_delay_model, model_evaluation, champion_model]
