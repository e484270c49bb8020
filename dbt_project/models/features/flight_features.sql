{{ config(materialized='incremental', incremental_strategy='append',
          pre_hook="{{ replace_window('flight_date') }}", tags=['daily']) }}
{#
  One row per flight (key flight_id), everything known before departure, plus the label.

  Point-in-time correctness: the rolling aggregates for a flight on day D use only flights of
  days D-N .. D-1 (RANGE ... AND 1 DAY PRECEDING), never day D or later. Adding or changing later
  days never changes an earlier day's features. Computing day D reads the daily stats of the
  `feature_lookback_days` days before it, which must have been built already (Dagster's
  partition mapping says so).

  Weather is the origin's last observation before the scheduled hour and the 3 observations up
  to it (precip_3h_in, min_visibility_3h_miles): nothing observed after the scheduled departure.

  Label: is_delayed (arrival delay > 15 minutes); NULL for cancelled and diverted flights.
#}
{% set lookback = var('feature_lookback_days') %}
with stats as (
    select * from {{ ref('agg_daily_route_stats') }}
    where {{ in_window('flight_date', lookback) }}
),
{% for grain, columns in [('carrier', 'carrier'), ('origin', 'origin'), ('route', 'origin, dest'), ('origin_hour', 'origin, sched_dep_hour')] %}
{{ grain }}_daily as (
    select flight_date, {{ columns }},
           sum(n_flights) as n_flights, sum(n_arrived) as n_arrived, sum(n_delayed) as n_delayed
    from stats group by all
),
{{ grain }}_rolling as (
    select flight_date, {{ columns }},
        {{ rolling_delay_rate(columns, 1) }}  as {{ grain }}_delay_rate_1d,
        {{ rolling_delay_rate(columns, 7) }}  as {{ grain }}_delay_rate_7d,
        {{ rolling_delay_rate(columns, 28) }} as {{ grain }}_delay_rate_28d,
        {{ rolling_count(columns, 28) }}      as {{ grain }}_flights_28d
    from {{ grain }}_daily
),
{% endfor %}
flights as (
    select * from {{ ref('fct_flights') }} where {{ in_window('flight_date') }}
),
holidays as (
    select holiday_date from {{ ref('us_federal_holidays') }}
)
select
    f.flight_id,
    f.flight_date,
    f.carrier,
    f.flight_number,
    f.tailnum,
    f.origin,
    f.dest,
    f.origin || '-' || f.dest                          as route,
    -- calendar and schedule
    month(f.flight_date)                               as month,
    isodow(f.flight_date)                              as day_of_week,
    isodow(f.flight_date) >= 6                         as is_weekend,
    f.sched_dep_hour,
    f.sched_dep_time,
    f.sched_arr_time,
    f.distance_miles,
    (select min(abs(date_diff('day', f.flight_date, h.holiday_date))) from holidays h) as days_to_holiday,
    -- the day's schedule (published in advance)
    count(*) over (partition by f.flight_date, f.origin, f.sched_dep_hour) as origin_departures_same_hour,
    count(*) over (partition by f.flight_date, f.origin)                   as origin_departures_day,
    count(*) over (partition by f.flight_date, f.carrier)                  as carrier_departures_day,
    -- aircraft
    f.plane_age_years,
    f.plane_seats,
    -- the origin's weather: the last observation before the scheduled hour (NULL when not delivered)
    f.has_weather,
    f.temp_f, f.dewpoint_f, f.humidity_pct, f.wind_dir_deg, f.wind_speed_mph, f.wind_gust_mph,
    f.precip_in, f.pressure_mbar, f.visibility_miles, f.precip_3h_in, f.min_visibility_3h_miles,
    -- point-in-time rolling aggregates (earlier days only)
    c.carrier_delay_rate_1d, c.carrier_delay_rate_7d, c.carrier_delay_rate_28d, c.carrier_flights_28d,
    o.origin_delay_rate_1d, o.origin_delay_rate_7d, o.origin_delay_rate_28d, o.origin_flights_28d,
    r.route_delay_rate_1d, r.route_delay_rate_7d, r.route_delay_rate_28d, r.route_flights_28d,
    oh.origin_hour_delay_rate_28d,
    -- label
    f.arrival_status,
    f.arr_delay_minutes,
    f.is_delayed
from flights f
left join carrier_rolling c on c.flight_date = f.flight_date and c.carrier = f.carrier
left join origin_rolling o on o.flight_date = f.flight_date and o.origin = f.origin
left join route_rolling r on r.flight_date = f.flight_date and r.origin = f.origin and r.dest = f.dest
left join origin_hour_rolling oh
    on oh.flight_date = f.flight_date and oh.origin = f.origin and oh.sched_dep_hour = f.sched_dep_hour
