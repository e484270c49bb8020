"""Resources shared by the asset graph, configured from ``Settings`` (``Settings.config``:
``EnvVar`` where the variable is set, the default under ``MLPLATFORM_HOME`` otherwise)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from dagster import ConfigurableResource
from dagster_duckdb import DuckDBResource
from pydantic import Field

from mlplatform.settings import Settings
from mlplatform.warehouse import LOCK_WAIT_SECONDS, connect


class LandingZone(ConfigurableResource):
    """The directory where the upstream system delivers its files (see ``ingest.landing``)."""

    path: str = Field(description="Root of the landing zone.")

    @property
    def root(self) -> Path:
        return Path(self.path)


MEMORY_LIMIT = Field(
    "512MB",
    description="DuckDB's memory limit (its default is 80% of the machine's memory); past it, DuckDB spills "
    "to disk next to the warehouse. Set by MLPLATFORM_DUCKDB_MEMORY_LIMIT.",
)


class Warehouse(DuckDBResource):
    """Read-write connections, for steps that write (they also declare the warehouse pool).
    Dagster's DuckDBResource, with DuckDB's memory limit set and the platform's one retry policy
    while another process holds DuckDB's lock (``warehouse.retry_while_locked``)."""

    memory_limit: str = MEMORY_LIMIT
    max_wait_seconds: float = Field(LOCK_WAIT_SECONDS, description="How long to wait for another writer.")

    @contextlib.contextmanager
    def get_connection(self):
        conn = connect(self.database, max_wait=self.max_wait_seconds,
                       config={**self.connection_config, "memory_limit": self.memory_limit})
        try:
            yield conn
        finally:
            conn.close()


def warehouse_resource(settings: Settings) -> Warehouse:
    return Warehouse(database=settings.database_config(), memory_limit=settings.config("duckdb_memory_limit"))


class WarehouseReader(ConfigurableResource):
    """Read-only connections to the warehouse, for steps that only read (training, the reference
    profile). Read-only processes share DuckDB's lock with each other but not with a writer, so
    a connection waits while a writing step of another run holds it."""

    database: str = Field(description="Path of the DuckDB warehouse, or ducklake:<catalog>.")
    max_wait_seconds: float = Field(
        LOCK_WAIT_SECONDS, description="How long to wait for writers (a backfill of many runs hands the lock from "
        "one to the next)."
    )
    memory_limit: str = MEMORY_LIMIT

    @contextlib.contextmanager
    def get_connection(self):
        conn = connect(self.database, read_only=True, max_wait=self.max_wait_seconds,
                       config={"memory_limit": self.memory_limit})
        try:
            yield conn
        finally:
            conn.close()


def warehouse_reader_resource(settings: Settings) -> WarehouseReader:
    return WarehouseReader(database=settings.database_config(), memory_limit=settings.config("duckdb_memory_limit"))


def landing_resource(settings: Settings) -> LandingZone:
    return LandingZone(path=settings.config("landing"))


class ProfileStore(ConfigurableResource):
    """Where whylogs profiles are kept: one per day, one reference per champion version."""

    path: str = Field(description="Root directory of the profiles.")

    def day(self, day) -> Path:
        return Path(self.path) / "daily" / f"{day}.bin"

    def reference(self, model: str, version: str) -> Path:
        return Path(self.path) / "reference" / f"{model}-v{version}.bin"


def profile_store_resource(settings: Settings) -> ProfileStore:
    return ProfileStore(path=settings.config("profiles"))
