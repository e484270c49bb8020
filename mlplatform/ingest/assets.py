"""Dagster assets for ingestion: thin glue over ``load`` and ``checks``.

``raw_flights`` and ``raw_weather`` are daily-partitioned and backfill a range in one run. Their
checks run in the same step, over the days just loaded; the blocking ones stop everything
downstream when they fail.
"""


from typing import Callable

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetsDefinition,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from dagster_duckdb import DuckDBResource
from pydantic import Field

from mlplatform.ingest import checks
from mlplatform.ingest.contracts import DAILY, REFERENCE, Contract
from mlplatform.ingest.load import PartitionLoad, load
from mlplatform.monitoring.costs import measured
from mlplatform.partitions import daily_partitions, days_between, single_run, window_of
from mlplatform.resources import LandingZone
from mlplatform.warehouse import table_metadata

OWNERS = ["team:data-platform"]


class IngestConfig(Config):
    max_quarantine_share: float = Field(
        checks.MAX_QUARANTINE_SHARE,
        description="Largest share of a day's rows that may be quarantined before the day is blocked.",
    )
    null_spike_tolerance: float = Field(
        checks.NULL_SPIKE_TOLERANCE,
        description=f"Warn when a column's null rate exceeds its trailing {checks.TRAILING_DAYS}-day mean "
        "by this much.",
    )
    max_unexplained_null_share: float = Field(
        checks.MAX_UNEXPLAINED_NULL_SHARE,
        description="Block a day when a column is null in more than this share of its rows without an explanation "
        "from the contract (cancellations, for flights); columns with their own limit in the contract keep it.",
    )


# (name, blocking, description, function(conn, contract, start, end, config))
CheckFn = Callable[..., checks.Outcome]
CHECKS: list[tuple[str, bool, str, CheckFn]] = [
    ("schema_matches_contract", True, "Columns and types of the raw table are the contract's.",
     lambda conn, c, s, e, cfg: checks.schema_matches(conn, c)),
    ("key_is_unique", True, "No two rows share the contract's key.",
     lambda conn, c, s, e, cfg: checks.key_unique(conn, c, s, e)),
    ("values_pass_rules", True, "No row breaks a row-level rule (ranges, formats, non-null keys).",
     lambda conn, c, s, e, cfg: checks.rules_hold(conn, c, s, e)),
    ("quarantine_share_ok", True, "No day has more than max_quarantine_share of its rows quarantined.",
     lambda conn, c, s, e, cfg: checks.quarantine_share(conn, c, s, e, cfg.max_quarantine_share)),
]
DAILY_CHECKS: list[tuple[str, bool, str, CheckFn]] = [
    ("rows_match_partition", True, "Every row's date is its partition's day.",
     lambda conn, c, s, e, cfg: checks.rows_in_partition(conn, c, s, e)),
    ("nulls_are_explained", True, "No column is null in more of a day's rows than its limit beyond what the "
     "contract explains (cancellations, for flights): a null wave on flights that departed blocks the day.",
     lambda conn, c, s, e, cfg: checks.nulls_explained(conn, c, s, e, cfg.max_unexplained_null_share)),
    ("no_null_rate_spike", False,
     f"No column's null rate jumps against the trailing {checks.TRAILING_DAYS} days (warns).",
     lambda conn, c, s, e, cfg: checks.null_rate_spike(conn, c, s, e, tolerance=cfg.null_spike_tolerance)),
    ("row_count_sane", False,
     f"Each day has rows, within 0.5x-2x of the trailing {checks.TRAILING_DAYS}-day median (warns).",
     lambda conn, c, s, e, cfg: checks.row_count_sane(conn, c, s, e)),
]


def _summary(results: list[PartitionLoad]) -> dict:
    loaded = sum(r.loaded for r in results)
    quarantined = sum(r.quarantined for r in results)
    by_rule: dict[str, int] = {}
    for r in results:
        for rule, n in r.by_rule.items():
            by_rule[rule] = by_rule.get(rule, 0) + n
    meta = {
        "rows_loaded": MetadataValue.int(loaded),
        "rows_quarantined": MetadataValue.int(quarantined),
        "quarantined_by_rule": MetadataValue.json(by_rule),
        "files": MetadataValue.int(sum(not r.missing for r in results)),
    }
    missing = [str(r.day) for r in results if r.missing]
    if missing:
        meta["days_without_delivery"] = MetadataValue.json(missing)
    if len(results) <= 31:
        lines = ["| day | file | loaded | quarantined |", "|---|---|---|---|"]
        lines += [
            f"| {r.day or '-'} | {r.source_file or 'not delivered'} | {r.loaded} | {r.quarantined} |"
            for r in results
        ]
        meta["loads"] = MetadataValue.md("\n".join(lines))
    return meta


def build_raw_asset(contract: Contract) -> AssetsDefinition:
    key = f"raw_{contract.name}"
    specs = CHECKS + (DAILY_CHECKS if contract.partitioned else [])

    @asset(
        name=key,
        group_name="ingest",
        description=f"raw.{contract.name}: {contract.description} Rows that break a contract rule "
        f"go to quarantine.{contract.name} instead.",
        partitions_def=daily_partitions if contract.partitioned else None,
        backfill_policy=single_run if contract.partitioned else None,
        kinds={"duckdb", "python"},
        owners=OWNERS,
        # "daily" marks every daily-partitioned asset (dbt's daily models carry it too), so that
        # `--select tag:daily` picks the part of the graph a partition range applies to.
        tags={"layer": "raw", **({"daily": ""} if contract.partitioned else {})},
        check_specs=[
            AssetCheckSpec(name, asset=key, blocking=blocking, description=description)
            for name, blocking, description, _ in specs
        ],
        pool="warehouse_writer",
    )
    @measured
    def _raw(
        context: AssetExecutionContext, config: IngestConfig, warehouse: DuckDBResource, landing: LandingZone
    ) -> MaterializeResult:
        start = end = None
        if contract.partitioned:
            start, end = window_of(context)
        with warehouse.get_connection() as conn:
            results = load(conn, contract, landing.root, days_between(start, end) if start else None)
            check_results = []
            for name, blocking, _, fn in specs:
                outcome = fn(conn, contract, start, end, config)
                check_results.append(
                    AssetCheckResult(
                        check_name=name,
                        passed=outcome.passed,
                        severity=AssetCheckSeverity.ERROR if blocking else AssetCheckSeverity.WARN,
                        description=outcome.description,
                        metadata={k: MetadataValue.json(v) if isinstance(v, (list, dict)) else v
                                  for k, v in outcome.metadata.items()},
                    )
                )
            metadata = table_metadata(conn, "raw", contract.name, sum(r.loaded for r in results))
        context.log.info(
            "%s: %d rows loaded, %d quarantined, %d files",
            key, sum(r.loaded for r in results), sum(r.quarantined for r in results),
            sum(not r.missing for r in results),
        )
        return MaterializeResult(metadata=metadata | _summary(results), check_results=check_results)

    return _raw


raw_assets = [build_raw_asset(c) for c in DAILY + REFERENCE]
