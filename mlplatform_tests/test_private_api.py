"""Every private or internal API the platform uses (``mlplatform/private_api.py``), checked against
the pinned versions: a rename or removal fails here, not silently in production."""

from __future__ import annotations

import subprocess

from dagster import DagsterInstance
from dagster_dbt import DbtCliResource

from mlplatform import private_api
from mlplatform.settings import DBT_PROJECT_DIR, dbt_executable

LANE = "unit"


def test_the_dbt_methods_it_overrides_exist_and_the_version_is_dbts():
    for name in ("_cli_version", "_initialize_dbt_core_adapter"):
        assert hasattr(DbtCliResource, name), f"dagster-dbt no longer has DbtCliResource.{name}"
    resource = private_api.DbtCliWithoutPerCallCosts(project_dir=str(DBT_PROJECT_DIR), dbt_executable=dbt_executable())
    assert resource._initialize_dbt_core_adapter([]) is None
    printed = subprocess.run([dbt_executable(), "--version"], capture_output=True, text=True, check=True).stdout
    assert f"installed: {resource._cli_version}" in printed, printed


def test_pool_limits_and_slots_through_the_event_log_storage(tmp_path):
    with DagsterInstance.local_temp(str(tmp_path)) as instance:  # SQLite storage, as `mlplatform init` makes
        assert private_api.storage_is_local_sqlite(instance)
        assert private_api.set_pool_limit_if_default(instance, "warehouse_writer", 1)
        assert instance.event_log_storage.get_concurrency_info("warehouse_writer").slot_count == 1
        # a limit someone set is kept
        instance.event_log_storage.set_concurrency_slots("warehouse_writer", 3)
        private_api.set_pool_limit_if_default(instance, "warehouse_writer", 1)
        assert instance.event_log_storage.get_concurrency_info("warehouse_writer").slot_count == 3
        # a slot held by a run that no longer exists is freed
        storage = instance.event_log_storage
        claimed = storage.claim_concurrency_slot("warehouse_writer", "gone-run", "step")
        assert claimed.is_claimed and "gone-run" in storage.get_concurrency_run_ids()
        assert private_api.free_slots_of_ended_runs(instance) == ["gone-run"]
        assert "gone-run" not in storage.get_concurrency_run_ids()
