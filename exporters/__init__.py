"""What leaves the host: the Prometheus collectors (metrics.py), the /metrics server
(http.py), and the alert rules and Grafana dashboard that consume the metrics."""
