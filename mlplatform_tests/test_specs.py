"""The shape of the graph, as a snapshot: asset keys, groups, partitions, the partition mappings of
their dependencies, automation conditions, checks (and which block), the jobs' selections, the
sensors and schedules. An unintended change of any of them fails here; an intended one is
recorded with ``MLPLATFORM_UPDATE_SNAPSHOTS=1 .venv/bin/pytest mlplatform_tests/test_specs.py``
and reviewed in the diff of ``snapshots/graph.json``.

Also: building the code location writes nothing to the process's environment."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlplatform.definitions import build_defs
from mlplatform.settings import Settings

LANE = "unit"
SNAPSHOT = Path(__file__).parent / "snapshots" / "graph.json"
UPDATE = bool(os.environ.get("MLPLATFORM_UPDATE_SNAPSHOTS"))  # (read before the test's home clears MLPLATFORM_*)


def describe(defs) -> dict:
    graph = defs.resolve_asset_graph()
    assets = {}
    for spec in sorted(defs.resolve_all_asset_specs(), key=lambda s: s.key.to_user_string()):
        condition = spec.automation_condition
        assets[spec.key.to_user_string()] = {
            "group": spec.group_name,
            "partitions": type(spec.partitions_def).__name__ if spec.partitions_def else None,
            "deps": {dep.asset_key.to_user_string(): repr(dep.partition_mapping) if dep.partition_mapping else None
                     for dep in sorted(spec.deps, key=lambda d: d.asset_key.to_user_string())},
            "automation": (condition.get_label() or type(condition).__name__) if condition else None,
            "skippable": spec.skippable,
            "pool": graph.get(spec.key).pools and sorted(graph.get(spec.key).pools) or None,
            "freshness": repr(spec.freshness_policy) if spec.freshness_policy else None,
        }
    checks = {
        f"{key.asset_key.to_user_string()}:{key.name}": graph.get_check_spec(key).blocking
        for key in sorted(graph.asset_check_keys, key=lambda k: (k.asset_key.to_user_string(), k.name))
    }
    repository = defs.get_repository_def()
    jobs = {}
    for job in sorted(repository.get_all_jobs(), key=lambda j: j.name):
        if job.name.startswith("__"):
            continue
        jobs[job.name] = {
            "assets": sorted(k.to_user_string() for k in job.asset_layer.selected_asset_keys),
            "checks": sorted(f"{k.asset_key.to_user_string()}:{k.name}"
                             for k in job.asset_layer.asset_graph.asset_check_keys),
            "steps": sorted(str(name) for name in job.graph.node_dict),
            "partitioned": job.partitions_def is not None,
        }
    return {
        "assets": assets,
        "checks": checks,
        "jobs": jobs,
        "sensors": sorted(s.name for s in repository.sensor_defs),
        "schedules": sorted(f"{s.name} {s.cron_schedule}" for s in repository.schedule_defs),
    }


def test_the_graph_is_what_the_snapshot_says(home):
    before = dict(os.environ)
    shape = describe(build_defs(Settings.from_env()))
    assert dict(os.environ) == before, "building the Definitions changed the environment"
    if UPDATE:
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(shape, indent=2, sort_keys=True) + "\n")
    recorded = json.loads(SNAPSHOT.read_text())
    assert shape == recorded, ("the graph changed: if on purpose, record it with MLPLATFORM_UPDATE_SNAPSHOTS=1 "
                               "and review the diff of mlplatform_tests/snapshots/graph.json")
