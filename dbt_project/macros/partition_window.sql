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
  Point-in-time rolling delay rate of a grain (e.g. carrier) over the `days` days before each
  flight date, from daily stats: flights of the same date or later are never used.
#}
{% macro rolling_delay_rate(grain, days) -%}
    sum(n_delayed) OVER (
        PARTITION BY {{ grain }} ORDER BY flight_date
        RANGE BETWEEN INTERVAL {{ days }} DAY PRECEDING AND INTERVAL 1 DAY PRECEDING
    ) / nullif(sum(n_arrived) OVER (
        PARTITION BY {{ grain }} ORDER BY flight_date
        RANGE BETWEEN INTERVAL {{ days }} DAY PRECEDING AND INTERVAL 1 DAY PRECEDING
    ), 0)
{%- endmacro %}

{% macro rolling_count(grain, days) -%}
    coalesce(sum(n_flights) OVER (
        PARTITION BY {{ grain }} ORDER BY flight_date
        RANGE BETWEEN INTERVAL {{ days }} DAY PRECEDING AND INTERVAL 1 DAY PRECEDING
    ), 0)
{%- endmacro %}
