"""Small helpers over the DuckDB warehouse shared by the asset layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dagster import MetadataValue, TableColumn, TableSchema

if TYPE_CHECKING:
    import duckdb


def column_schema(conn: duckdb.DuckDBPyConnection, schema: str, table: str) -> TableSchema:
    rows = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
        [schema, table],
    ).fetchall()
    return TableSchema(columns=[TableColumn(name, kind) for name, kind in rows])


def table_metadata(conn: duckdb.DuckDBPyConnection, schema: str, table: str, rows: int) -> dict:
    """Dagster's standard table metadata: name, column schema and the rows this run wrote."""
    return {
        "dagster/table_name": f"warehouse.{schema}.{table}",
        "dagster/column_schema": column_schema(conn, schema, table),
        "dagster/row_count": MetadataValue.int(rows),
    }
