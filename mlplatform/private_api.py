"""Every use of a library's private or internal API, in one place, with what it saves.

``test_private_api.py`` checks each against the pinned versions, so an upgrade that renames or
removes one fails the suite instead of silently getting slower or leaking pool slots. (whylogs'
metric internals, which build profiles from numpy ~15x faster than ``why.log``, stay in
``monitoring/profiles.py``, the only module that imports whylogs; ``test_drift`` checks them
against ``why.log``.)
"""

from __future__ import annotations

from functools import cached_property

from dagster import DagsterInstance
from dagster_dbt import DbtCliResource


class DbtCliWithoutPerCallCosts(DbtCliResource):
    """dagster-dbt's dbt resource without two costs of every ``cli()`` call that buy us nothing.

    - ``_cli_version``: ``dbt --version`` in a subprocess (to tell dbt-core from the Fusion
      engine), ~2 s per call here, more than the dbt build of a day. The dbt that runs is the
      dbt-core installed beside this interpreter, so the version is the package's.
    - ``_initialize_dbt_core_adapter``: a dbt adapter set up in this process (profile, project,
      a parse of dbt's ~500 base macros: ~0.6 s), which only serves
      ``fetch_row_counts()``/``fetch_column_metadata()``; this project reads row counts and
      schemas itself once dbt has exited."""

    def _initialize_dbt_core_adapter(self, args):
        return None

    @cached_property
    def _cli_version(self):
        from importlib.metadata import version as installed

        from packaging import version

        return version.parse(installed("dbt-core"))


# --- Dagster's pool (op concurrency) slots, through the event log storage --------------------
# Public: the pools in dagster.yaml and `dagster instance concurrency set` (a CLI process, ~3 s).
# These calls do the same in the process that already holds the instance.

def set_pool_limit_if_default(instance: DagsterInstance, pool: str, limit: int) -> bool:
    """Give ``pool`` its limit in the instance now, unless someone set one. Left to Dagster's
    lazy default-limit initialisation, runs that start at the same moment can each initialise
    the pool and claim a slot of their own. False where the storage has no pools."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return False
    info = storage.get_concurrency_info(pool)
    if info.using_default_limit or info.limit is None:
        storage.set_concurrency_slots(pool, limit)
    return True


def free_slots_of_ended_runs(instance: DagsterInstance) -> list[str]:
    """Free the pool slots still claimed by runs that have finished or no longer exist (a run
    whose process died is marked failed by Dagster's code server, which does not free its
    slots: every later warehouse step would wait for them)."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    freed = []
    for run_id in storage.get_concurrency_run_ids():
        run = instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            storage.free_concurrency_slots_for_run(run_id)
            freed.append(run_id)
    return freed


def storage_is_local_sqlite(instance: DagsterInstance) -> bool:
    """Whether the runs are recorded in SQLite files (so they executed on this machine): a pid
    in a run's events says something only then."""
    return "sqlite" in type(instance.run_storage).__name__.lower()
