"""Container image, Helm chart and Grafana dashboard checks."""
