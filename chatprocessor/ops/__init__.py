"""Operations: logging, Prometheus metrics and the /health, /ready, /metrics server."""
