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
