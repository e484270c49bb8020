"""Operating the platform: its Prometheus exporter, alert rules, Prometheus and Alertmanager."""
