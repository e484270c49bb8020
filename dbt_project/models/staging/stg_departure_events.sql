{{ config(materialized='incremental', incremental_strategy='append',
          pre_hook="{{ replace_window('flight_date') }}", tags=['daily']) }}
{#
  The departures as they were streamed (raw.flight_events, kind 'departure'): what the airports'
  systems told us during the day, each with the instant it happened (event_time, UTC, naive).
  The intraday features (rt_*, macros/flight_features.sql) are computed from these, as of a
  prediction time: only departures with event_time before it count.
  flight_date is the departing flight's local date of scheduled departure (the raw partition).
#}
select
    event_id,
    flight_id,
    _partition_date   as flight_date,
    carrier,
    origin,
    tailnum,
    event_time,
    dep_delay         as dep_delay_minutes
from {{ source('raw', 'flight_events') }}
where kind = 'departure' and {{ in_window('_partition_date') }}
