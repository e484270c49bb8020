"""Resources shared by the asset graph. Configured from environment variables (``EnvVar``);
``mlplatform.settings.apply_defaults`` fills the unset ones from ``MLPLATFORM_HOME``."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource, EnvVar
from dagster_duckdb import DuckDBResource
from pydantic import Field


class LandingZone(ConfigurableResource):
    """The directory where the upstream system delivers its files (see ``ingest.landing``)."""

    path: str = Field(description="Root of the landing zone.")

    @property
    def root(self) -> Path:
        return Path(self.path)


def warehouse_resource() -> DuckDBResource:
    return DuckDBResource(database=EnvVar("MLPLATFORM_WAREHOUSE"))


def landing_resource() -> LandingZone:
    return LandingZone(path=EnvVar("MLPLATFORM_LANDING"))


class ProfileStore(ConfigurableResource):
    """Where whylogs profiles are kept: one per day, one reference per champion version."""

    path: str = Field(description="Root directory of the profiles.")

    def day(self, day) -> Path:
        return Path(self.path) / "daily" / f"{day}.bin"

    def reference(self, model: str, version: str) -> Path:
        return Path(self.path) / "reference" / f"{model}-v{version}.bin"


def profile_store_resource() -> ProfileStore:
    return ProfileStore(path=EnvVar("MLPLATFORM_PROFILES"))
