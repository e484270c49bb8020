"""Resources shared by the asset graph. Configured from environment variables (``EnvVar``);
``mlplatform.settings.apply_defaults`` fills the unset ones from ``MLPLATFORM_HOME``."""

from __future__ import annotations

import contextlib
import time
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


MEMORY_LIMIT = Field(
    "512MB",
    description="DuckDB's memory limit (its default is 80% of the machine's memory); past it, DuckDB spills "
    "to disk next to the warehouse. Set by MLPLATFORM_DUCKDB_MEMORY_LIMIT.",
)


class Warehouse(DuckDBResource):
    """Read-write connections, for steps that write (they also declare pool "warehouse_writer");
    it retries while another process holds DuckDB's lock (about 100 s in all). Dagster's
    DuckDBResource, with DuckDB's memory limit set."""

    memory_limit: str = MEMORY_LIMIT

    @contextlib.contextmanager
    def get_connection(self):
        with super().get_connection() as conn:
            conn.execute("SET memory_limit = ?", [self.memory_limit])
            yield conn


def warehouse_resource() -> Warehouse:
    return Warehouse(database=EnvVar("MLPLATFORM_WAREHOUSE"), memory_limit=EnvVar("MLPLATFORM_DUCKDB_MEMORY_LIMIT"))


class WarehouseReader(ConfigurableResource):
    """Read-only connections to the warehouse, for steps that only read (training, the reference
    profile). Read-only processes share DuckDB's lock with each other but not with a writer, so
    a connection waits, with backoff, while a writing step of another run holds it."""

    database: str = Field(description="Path of the DuckDB warehouse.")
    max_wait_seconds: float = Field(
        600.0, description="How long to wait for writers (a backfill of many runs hands the lock from one to the next)."
    )
    memory_limit: str = MEMORY_LIMIT

    @contextlib.contextmanager
    def get_connection(self):
        import duckdb

        delay, waited = 0.1, 0.0
        while True:
            try:
                conn = duckdb.connect(self.database, read_only=True, config={"memory_limit": self.memory_limit})
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or waited >= self.max_wait_seconds:
                    raise
                time.sleep(delay)
                waited += delay
                delay = min(delay * 2, 5.0)
        try:
            yield conn
        finally:
            conn.close()


def warehouse_reader_resource() -> WarehouseReader:
    return WarehouseReader(database=EnvVar("MLPLATFORM_WAREHOUSE"), memory_limit=EnvVar("MLPLATFORM_DUCKDB_MEMORY_LIMIT"))


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
