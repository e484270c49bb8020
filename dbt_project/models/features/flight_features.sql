{{ config(materialized='incremental', incremental_strategy='append',
          pre_hook="{{ replace_window('flight_date') }}", post_hook="{{ fault_pause_before_commit() }}",
          tags=['daily']) }}
{#
  One row per flight (key flight_id): everything known before departure, plus the label.

  The features are computed by the flight_features() macro (macros/flight_features.sql), the one
  definition the online server compiles too (analyses/online_features.sql).

  Point-in-time correctness: the rolling aggregates for a flight on day D use only the daily stats
  of days D-28 .. D-1, never day D or later: adding or changing later days never changes an earlier
  day's features. Computing day D reads the stats of the `feature_lookback_days` days before it,
  which must have been built already (Dagster's partition mapping says so). Weather is the
  origin's last observation before the scheduled hour and the 3 observations up to it.

  Label: is_delayed (arrival delay > 15 minutes); NULL for cancelled and diverted flights.
#}
with flights as (
    select flight_id, flight_date, carrier, flight_number, tailnum, origin, dest,
           sched_dep_time, sched_arr_time, distance_miles,
           arrival_status, arr_delay_minutes, is_delayed
    from {{ ref('fct_flights') }}
    where {{ in_window('flight_date') }}
),
features as (
    {{ flight_features('flights') }}
)
select
    features.*,
    -- label
    f.arrival_status,
    f.arr_delay_minutes,
    f.is_delayed
from features
join flights f using (flight_id)
