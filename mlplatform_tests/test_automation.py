"""Declarative automation: a new raw partition is requested downstream with no manual step."""

from __future__ import annotations

from dagster import AssetKey, evaluate_automation_conditions

from mlplatform_tests.conftest import D, run_job

LANE = "integration"


STG_FLIGHTS = AssetKey(["staging", "stg_flights"])


def requested(result, key):
    return set(result.get_requested_partitions(key)) if result.get_num_requested(key) else set()


def test_new_raw_partition_flows_downstream(home, instance):
    from mlplatform.definitions import load_defs

    defs = load_defs(home)

    assert run_job(instance, "reference_job").success
    assert run_job(instance, "daily_job", D(2013, 1, 1)).success
    first = evaluate_automation_conditions(defs=defs, instance=instance)
    quiet = evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert requested(quiet, STG_FLIGHTS) == set()

    # a day ingested by itself (what the landing sensor requests) ...
    ingest = defs.resolve_job_def("daily_job").execute_in_process(
        instance=instance, partition_key="2013-01-02",
        asset_selection=[AssetKey("raw_flights"), AssetKey("raw_weather"), AssetKey("raw_flight_events")]
    )
    assert ingest.success
    # ... makes the automation request that day, and only that day, through the dbt chain to
    # the features, in one tick (Dagster runs a chain requested together in one run) ...
    after = evaluate_automation_conditions(defs=defs, instance=instance, cursor=quiet.cursor)
    for key in (STG_FLIGHTS.path, ["staging", "stg_weather"], ["staging", "stg_departure_events"],
                ["marts", "fct_flights"], ["marts", "agg_daily_route_stats"], ["features", "flight_features"]):
        assert requested(after, AssetKey(key)) == {"2013-01-02"}, key
    # ... but not the predictions, which need a champion model that does not exist yet
    assert requested(after, AssetKey(["predictions", "flight_delay"])) == set()
    assert requested(after, AssetKey("raw_flights")) == set()
