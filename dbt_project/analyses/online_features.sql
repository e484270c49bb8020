{#
  The online server's features: the same flight_features() macro as features.flight_features,
  applied to the `online_requests` table the server fills with the flights it is asked about.
  `mlplatform serve` compiles this once at start (dbt compile) and runs the SQL on a snapshot of
  the tables it reads.
#}
-- the server also checks requests against the airlines: depends_on: {{ ref('stg_airlines') }}
{{ flight_features('online_requests', online=true) }}
