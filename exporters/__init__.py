"""What leaves the host: JSON-lines events (and, later, the Prometheus exporter)."""
