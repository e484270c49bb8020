{{ config(materialized='incremental', incremental_strategy='append',
          pre_hook="{{ replace_window('flight_date') }}", tags=['daily']) }}
{# Flights enriched with the origin's last weather observation before the scheduled departure
   hour and the 3 observations up to it (the weather_before_departure() macro the features use),
   the airline, the destination airport and the aircraft. The departure hour is the features'
   local_hour_to_utc() of the scheduled local hour, so both read the same observation. #}
with flights as (
    select *, {{ local_hour_to_utc('flight_date', 'sched_dep_hour') }} as departure_hour_utc
    from {{ ref('stg_flights') }}
    where {{ in_window('flight_date') }}
),
departures as (
    select distinct origin, departure_hour_utc as sched_dep_hour_utc from flights
),
weather as (
    {{ weather_before_departure('departures') }}
)
select
    f.* exclude (departure_hour_utc),
    a.airline_name,
    d.airport_name                                 as dest_name,
    d.lat                                          as dest_lat,
    d.lon                                          as dest_lon,
    d.utc_offset_hours                             as dest_utc_offset_hours,
    p.year_built                                   as plane_year_built,
    year(f.flight_date) - p.year_built             as plane_age_years,
    p.seats                                        as plane_seats,
    p.engines                                      as plane_engines,
    coalesce(w.has_weather, false)                 as has_weather,
    w.temp_f, w.dewpoint_f, w.humidity_pct, w.wind_dir_deg, w.wind_speed_mph, w.wind_gust_mph,
    w.precip_in, w.pressure_mbar, w.visibility_miles, w.precip_3h_in, w.min_visibility_3h_miles
from flights f
left join weather w on w.origin = f.origin and w.sched_dep_hour_utc = f.departure_hour_utc
left join {{ ref('stg_airlines') }} a on a.carrier = f.carrier
left join {{ ref('stg_airports') }} d on d.faa = f.dest
left join {{ ref('stg_planes') }} p on p.tailnum = f.tailnum

