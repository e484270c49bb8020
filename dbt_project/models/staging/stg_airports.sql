{{ config(materialized='table', tags=['reference']) }}
select faa, name as airport_name, lat, lon, alt as altitude_ft, tz as utc_offset_hours, dst, tzone
from {{ source('raw', 'airports') }}
qualify row_number() over (partition by faa order by _ingested_at desc) = 1
