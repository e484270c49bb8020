{{ config(materialized='incremental', incremental_strategy='append',
          pre_hook="{{ replace_window('weather_date') }}", tags=['daily']) }}
{#
  Hourly weather, keyed by (origin, observed_hour_utc). The local hour 01:00 of 2013-11-03
  occurs twice (DST fall-back); both readings are distinct UTC hours and both are kept.
  2013-12-31 has no weather delivery: flights of that day get NULL weather (has_weather false).
#}
select
    origin,
    time_hour        as observed_hour_utc,
    _partition_date  as weather_date,
    temp             as temp_f,
    dewp             as dewpoint_f,
    humid            as humidity_pct,
    wind_dir         as wind_dir_deg,
    wind_speed       as wind_speed_mph,
    wind_gust        as wind_gust_mph,
    precip           as precip_in,
    pressure         as pressure_mbar,
    visib            as visibility_miles
from {{ source('raw', 'weather') }}
where {{ in_window('_partition_date') }}
qualify row_number() over (partition by origin, time_hour order by _ingested_at desc, _source_row) = 1
