"""MLflow behind a small Dagster resource: tracking and the model registry.

Local by default (SQLite store and artifacts under MLPLATFORM_HOME); point
``MLPLATFORM_MLFLOW_URI`` at a tracking server to use one. Every call names the tracking URI
explicitly, so nothing depends on MLflow's process-global state being set elsewhere.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dagster import ConfigurableResource, MetadataValue
from pydantic import Field

from mlplatform.partitions import Window
from mlplatform.settings import REPO_ROOT, Settings

CHAMPION = "champion"
CHALLENGER = "challenger"  # the latest trained version
SHADOW_ALIAS = "shadow"  # the staged rollout's (mlplatform.rollout)
CANARY_ALIAS = "canary"
CANARY_SHARE_TAG = "mlplatform.canary_share"  # a registered model tag: the share of flights the canary answers
# a registered version's training window, as tags of the version (read by ``training_window``)
TRAIN_START_TAG = "mlplatform.train_start"
TRAIN_END_TAG = "mlplatform.train_end"


def training_window(version) -> Window | None:
    """The days a registered model version trained on (its tags), or None when it was not
    registered by ``flight_delay_model``."""
    tags = version.tags
    if TRAIN_START_TAG not in tags or TRAIN_END_TAG not in tags:
        return None
    return Window(dt.date.fromisoformat(tags[TRAIN_START_TAG]), dt.date.fromisoformat(tags[TRAIN_END_TAG]))


@dataclass(frozen=True)
class TrainedModel:
    """A registered model version as the training graph passes it on: in its assets'
    materialization metadata (``metadata``/``from_metadata``)."""

    version: str
    run_id: str  # its MLflow run
    train: Window
    evaluation: Window

    def metadata(self) -> dict:
        return {
            "model_version": self.version,
            "mlflow_run_id": self.run_id,
            "train_window": MetadataValue.json(self.train.as_json()),
            "eval_window": MetadataValue.json(self.evaluation.as_json()),
        }

    @classmethod
    def from_metadata(cls, metadata: dict) -> "TrainedModel":
        return cls(str(metadata["model_version"]), str(metadata["mlflow_run_id"]),
                   Window.from_json(metadata["train_window"]), Window.from_json(metadata["eval_window"]))


class MlflowTracking(ConfigurableResource):
    tracking_uri: str = Field(description="MLflow tracking URI (sqlite:///..., http://...).")
    artifact_root: str = Field(description="Artifact location for new experiments (a path or URI).")
    experiment: str = Field("flight_delay", description="Experiment that training runs go to.")
    registered_model: str = Field("flight_delay", description="Registered model name.")
    ui_url: str = Field("", description="Base URL of the MLflow UI that asset metadata links to ('' for no links).")

    def client(self):
        """A client of this store (one per store and process: a new one would reconnect)."""
        return _client(self.tracking_uri)

    def experiment_id(self) -> str:
        client = self.client()
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = self.artifact_root
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:", location) is None:  # a path, not a URI (mlflow-artifacts:/, s3://)
            Path(location).mkdir(parents=True, exist_ok=True)
            location = Path(location).resolve().as_uri()
        return client.create_experiment(self.experiment, artifact_location=location)

    @contextlib.contextmanager
    def start_run(self, run_name: str, tags: dict[str, str]):
        """An MLflow run in our experiment, with the fluent API pointed at our store: MLflow's
        logging of a model works only through its process-wide current run and URIs, so this is
        the one place the platform sets them."""
        import mlflow

        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        experiment_id = self.experiment_id()
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
            yield run

    def run_url(self, run_id: str) -> str | None:
        """The run's page in the MLflow UI (MLflow 3's hash route), or None without a UI."""
        if not self.ui_url:
            return None
        experiment = self.client().get_run(run_id).info.experiment_id
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"

    def run_link(self, run_id: str) -> dict:
        """``{"mlflow_run": <url metadata>}`` for an asset's metadata, or nothing without a UI."""
        url = self.run_url(run_id)
        return {"mlflow_run": MetadataValue.url(url)} if url else {}

    def version_by_alias(self, alias: str):
        """The model version an alias points at, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client().get_model_version_by_alias(self.registered_model, alias)
        except MlflowException as exc:
            # only "no such alias / no such model" means none; an unreachable store is an error
            if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
                return None
            raise

    def set_alias(self, alias: str, version: str) -> None:
        self.client().set_registered_model_alias(self.registered_model, alias, str(version))

    def load_model(self, version: str):
        """The scikit-learn model of a registered version, read through this store alone (no
        process-wide MLflow URI): what training's gate, predictions and serving all load."""
        import tempfile

        from mlflow import artifacts
        from mlflow import sklearn as mlflow_sklearn

        # (a models:/ URI would be resolved through MLflow's process-wide registry URI: resolve it here)
        source = self.client().get_model_version_download_uri(self.registered_model, str(version))
        if source.startswith("file:"):  # a local store: read in place
            return mlflow_sklearn.load_model(source)
        with tempfile.TemporaryDirectory() as local:  # a server's (proxied) artifacts: through this store's URI
            path = artifacts.download_artifacts(artifact_uri=source, dst_path=local, tracking_uri=self.tracking_uri)
            return mlflow_sklearn.load_model(path)


@functools.lru_cache(maxsize=8)
def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def mlflow_resource(settings: Settings) -> MlflowTracking:
    return MlflowTracking(
        tracking_uri=settings.config("mlflow_uri"),
        artifact_root=settings.config("mlflow_artifacts"),
        ui_url=settings.config("mlflow_ui_url"),  # the UI `mlplatform ui` starts, by default
    )


def tracking_from(settings: Settings) -> MlflowTracking:
    """The MLflow resource with these settings' values, outside a run (sensors, the CLI)."""
    return MlflowTracking(tracking_uri=settings.mlflow_uri, artifact_root=str(settings.mlflow_artifacts),
                          ui_url=settings.mlflow_ui_url)


def git_state() -> tuple[str, bool]:
    """(commit, dirty) of the repository the code runs from; ('unknown', False) outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True,
            text=True, check=True, timeout=10,
        ).stdout.strip()
        return commit, bool(status)
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
