"""Ingest: the landing zone's files into raw DuckDB tables, behind contracts and quarantine."""
