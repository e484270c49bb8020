{{ config(materialized='incremental', incremental_strategy='append',
          pre_hook="{{ replace_window('flight_date') }}", tags=['daily']) }}
{#
  Typed, renamed, deduplicated flights.
  flight_id = '<local date>_<carrier><flight number>_<origin>_<scheduled departure HHMM>',
  e.g. '2013-01-01_UA1545_EWR_0515': deterministic, readable, and unique because the contract's
  key (date, carrier, flight, origin, sched_dep_time) is.
  Flights that never arrived (arr_delay null: 8,255 cancelled, 1,175 diverted in 2013) have
  arrival_status 'cancelled' or 'diverted' and is_delayed NULL: "arrival delay > 15 min" is
  undefined for them, so they are kept in the tables and left out of training and evaluation.
#}
select
    {{ flight_id('_partition_date', 'carrier', 'flight', 'origin', 'sched_dep_time') }}  as flight_id,
    _partition_date                                   as flight_date,
    carrier,
    flight                                            as flight_number,
    tailnum,
    origin,
    dest,
    sched_dep_time,
    sched_arr_time,
    dep_time,
    arr_time,
    cast(sched_dep_time // 100 as integer)            as sched_dep_hour,
    time_hour                                         as sched_dep_hour_utc,
    dep_delay                                         as dep_delay_minutes,
    arr_delay                                         as arr_delay_minutes,
    air_time                                          as air_time_minutes,
    distance                                          as distance_miles,
    case
        when dep_time is null then 'cancelled'
        when arr_delay is null then 'diverted'
        when arr_delay > 15 then 'delayed'
        else 'on_time'
    end                                               as arrival_status,
    case when arr_delay is not null then arr_delay > 15 end as is_delayed,
    _source_file,
    _ingested_at
from {{ source('raw', 'flights') }}
where {{ in_window('_partition_date') }}
qualify row_number() over (
    partition by _partition_date, carrier, flight, origin, sched_dep_time
    order by _ingested_at desc, _source_row
) = 1
