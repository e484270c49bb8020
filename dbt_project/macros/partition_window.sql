{#
  Daily partitions. Dagster runs a daily model for a window of days [min_date, max_date]; run
  standalone, the window is every day. A daily model:
    config(materialized='incremental', incremental_strategy='append',
           pre_hook=replace_window('flight_date'), tags=['daily'])
  and filters its input with in_window('<date column>').
  The pre-hook deletes the window inside the model's transaction, so the window is replaced
  atomically and re-running it never duplicates rows.

  The window comes from `--vars '{"min_date": .., "max_date": ..}'` when given, else from the
  environment variables MLPLATFORM_MIN_DATE and MLPLATFORM_MAX_DATE, which is how Dagster passes
  it, and it is read only when dbt executes (`execute`), not while it parses. Both keep dbt's
  partial parsing: when --vars change dbt re-parses the whole project (dbt-core #6323), and when
  an environment variable read at parse time changes it re-parses the files that read it; either
  costs 1-2 s of every daily run here (benchmarks/README.md). At parse time the window is every
  day, which only the SQL dbt compiles at execution would use.
#}
{% macro window_start() -%}
    {%- if execute -%}{{ var("min_date", env_var("MLPLATFORM_MIN_DATE", "1900-01-01")) }}{%- else -%}1900-01-01{%- endif -%}
{%- endmacro %}

{% macro window_end() -%}
    {%- if execute -%}{{ var("max_date", env_var("MLPLATFORM_MAX_DATE", "2999-12-31")) }}{%- else -%}2999-12-31{%- endif -%}
{%- endmacro %}

{% macro in_window(column, lookback_days=0) -%}
    {{ column }} BETWEEN CAST('{{ window_start() }}' AS DATE) - INTERVAL {{ lookback_days }} DAY
                     AND CAST('{{ window_end() }}' AS DATE)
{%- endmacro %}

{% macro replace_window(column) -%}
    {% if is_incremental() %}DELETE FROM {{ this }} WHERE {{ in_window(column) }}{% endif %}
{%- endmacro %}

{#
  Fault injection for the crash-recovery tests (mlplatform_tests/test_operations.py): with the
  environment variable MLPLATFORM_FAULT_PAUSE_BEFORE_COMMIT set to <model>=<path>, that model,
  which runs this as a post-hook (inside its transaction, after its rows are written, before
  COMMIT), writes <path> and then runs a query that does not end, so that the test can kill the
  run in the middle of the model's write. Unset, as always outside those tests, it is a no-op.
#}
{% macro fault_pause_before_commit() -%}
    {%- set fault = env_var('MLPLATFORM_FAULT_PAUSE_BEFORE_COMMIT', '').split('=', 1) -%}
    {%- if fault | length == 2 and fault[0] == this.identifier -%}
        COPY (SELECT 1 AS paused) TO '{{ fault[1] }}' (HEADER false);
        SELECT count(*) FROM range(1000000000000)
    {%- else -%}
        SELECT 1
    {%- endif -%}
{%- endmacro %}
