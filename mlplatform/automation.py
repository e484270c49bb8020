"""Declarative automation shared by the downstream assets."""

from __future__ import annotations

from dagster import AssetSelection, AutomationCondition


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
