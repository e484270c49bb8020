{{ config(materialized='table', tags=['reference']) }}
select tailnum, year as year_built, type as aircraft_type, manufacturer, model, engines, seats, engine as engine_type
from {{ source('raw', 'planes') }}
qualify row_number() over (partition by tailnum order by _ingested_at desc) = 1
