"""Declarative automation shared by the downstream assets, and what "fresh" means for the daily ones."""

from __future__ import annotations

import datetime as dt
import warnings

from dagster import (
    AssetSelection,
    AutomationCondition,
    Definitions,
    FreshnessPolicy,
    PreviewWarning,
    apply_freshness_policy,
)

from mlplatform import keys

# A day is delivered every day: a daily asset that has not materialized for 26 hours (the day and
# two hours of slack for the night's runs) is failing its freshness, and warned after 24 hours.
# Dagster's daemon evaluates it (the UI's asset health shows it); the exporter publishes the state
# (mlplatform_asset_freshness_state) and the DailyAssetStale alert fires on FAIL.
DAILY_FRESHNESS = FreshnessPolicy.time_window(fail_window=dt.timedelta(hours=26), warn_window=dt.timedelta(hours=24))
# the daily assets that must be fresh: what serving, the model's monitoring and retraining read
MUST_BE_FRESH = (keys.RAW_FLIGHTS, keys.RAW_WEATHER, keys.FEATURES, keys.PREDICTIONS, keys.DRIFT_REPORT,
                 keys.MODEL_PERFORMANCE)


# Dagster labels the one way to set a policy on dbt's and the other assets' specs after they are
# built "preview": silence that label, not Dagster's warnings in general
warnings.filterwarnings("ignore", message=r"Function `Definitions.map_resolved_asset_specs`", category=PreviewWarning)


def with_freshness(defs: Definitions) -> Definitions:
    """``defs`` with ``DAILY_FRESHNESS`` on the assets of ``MUST_BE_FRESH``."""
    return defs.map_resolved_asset_specs(selection=AssetSelection.assets(*MUST_BE_FRESH),
                                         func=lambda spec: apply_freshness_policy(spec, DAILY_FRESHNESS))


def on_new_data(ignore: AssetSelection | None = None) -> AutomationCondition:
    """Dagster's ``eager()`` for every partition, not only the latest one (our days are all in
    the past): run a partition when one of its dependencies was updated, once none is missing or
    in progress and their blocking checks passed. ``ignore`` names dependencies whose updates
    should not trigger a re-run (a new champion does not re-score history)."""
    updated = AutomationCondition.any_deps_updated()
    if ignore is not None:
        updated = updated.ignore(ignore)
    return (
        (AutomationCondition.newly_missing() | updated).since_last_handled()
        & ~AutomationCondition.any_deps_missing()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
        & AutomationCondition.all_deps_blocking_checks_passed()
    ).with_label("on_new_data")
