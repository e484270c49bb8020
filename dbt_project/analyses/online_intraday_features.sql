{#
  The online server's intraday (rt_) features alone: the same flight_features() macro, with
  intraday_only=true, on the `online_requests` table. The server recomputes them for the
  scheduled flights the event stream moved, every second at most (mlplatform/serving/service.py).
#}
{{ flight_features('online_requests', online=true, intraday_only=true) }}
