"""What a step acts on comes from its upstream's materialization, never from a mutable pointer.

A model version is decided once, by the step that made it (training registers it, the gate
approves it, ``champion_model`` promotes it), and written into that asset's materialization
metadata. Every later step reads it from there: from the materialization its own run made when
the run included the upstream asset, else from the upstream's latest materialization (the asset
was launched on its own). Two training runs started together therefore never act on each
other's versions, which an MLflow alias read at run time cannot promise (aliases are moved last,
for serving).
"""

from __future__ import annotations

from typing import Any

from dagster import AssetKey, AssetRecordsFilter, Failure


def _values(record) -> dict[str, Any]:
    metadata = record.asset_materialization.metadata
    return {name: getattr(value, "value", value) for name, value in metadata.items()}


def upstream_metadata(context, key: AssetKey, missing: str) -> dict[str, Any]:
    """The metadata of ``key``'s materialization in this run, or of its latest one; ``missing``
    is the message of the ``Failure`` raised when it was never materialized."""
    instance = context.instance
    run = instance.get_run_record_by_id(context.run_id)
    after = run.create_timestamp.timestamp() if run is not None else None
    cursor = None
    while True:  # newest first: this run's is among the few made since it was created
        page = instance.fetch_materializations(AssetRecordsFilter(asset_key=key, after_timestamp=after),
                                               limit=100, cursor=cursor)
        for record in page.records:
            if record.run_id == context.run_id:
                return _values(record)
        if not page.has_more:
            break
        cursor = page.cursor
    latest = instance.get_latest_materialization_event(key)
    if latest is None:
        raise Failure(missing)
    return _values(latest)
