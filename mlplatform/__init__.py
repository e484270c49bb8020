"""mlplatform: a data and ML platform as one Dagster asset graph."""
