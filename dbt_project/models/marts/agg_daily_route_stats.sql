{{ config(materialized='incremental', incremental_strategy='append',
          pre_hook="{{ replace_window('flight_date') }}", tags=['daily']) }}
{# Per day, carrier, route and scheduled departure hour: flights, arrivals, delayed arrivals. The input of the rolling
   features; n_arrived excludes cancelled and diverted flights. #}
select
    flight_date,
    carrier,
    origin,
    dest,
    sched_dep_hour,
    count(*)                                   as n_flights,
    count(arr_delay_minutes)                   as n_arrived,
    count(*) filter (where is_delayed)         as n_delayed,
    count(*) filter (where arrival_status = 'cancelled') as n_cancelled
from {{ ref('stg_flights') }}
where {{ in_window('flight_date') }}
group by all
