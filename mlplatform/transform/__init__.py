"""Transform: dbt (dbt-duckdb) from raw to staging, marts and point-in-time feature tables."""
