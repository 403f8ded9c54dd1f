"""Monitoring: the reconciler's own metrics, the GPU exporter, and the Prometheus scrape
configuration generated from the desired state. Dashboards and alert rules live in the
repository's `monitoring/` directory; `docs/monitoring.md` says how they fit together."""
