{{ config(materialized='table', tags=['reference']) }}
select carrier, name as airline_name
from {{ source('raw', 'airlines') }}
qualify row_number() over (partition by carrier order by _ingested_at desc) = 1
