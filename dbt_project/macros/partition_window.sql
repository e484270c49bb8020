{#
  Daily partitions. Dagster runs a daily model for a window of days [min_date, max_date] passed
  as vars; standalone, the window is every day. A daily model:
    config(materialized='incremental', incremental_strategy='append',
           pre_hook=replace_window('flight_date'), tags=['daily'])
  and filters its input with in_window('<date column>').
  The pre-hook deletes the window inside the model's transaction, so the window is replaced
  atomically and re-running it never duplicates rows.
#}
{% macro in_window(column, lookback_days=0) -%}
    {{ column }} BETWEEN CAST('{{ var("min_date") }}' AS DATE) - INTERVAL {{ lookback_days }} DAY
                     AND CAST('{{ var("max_date") }}' AS DATE)
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
