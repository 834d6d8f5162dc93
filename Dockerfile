# syntax=docker/dockerfile:1
# The canary gateway: `docker build -t canary-gateway .`
# Data plane on 8080, admin API and /metrics on 9090 (deploy/docker/gateway.yaml). The same image
# runs the bundled model server: `gateway model-server --host 0.0.0.0 --port 9000 --name v1`.

# --- build: the package and its dependencies in a virtualenv ---------------------------------
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/gateway
WORKDIR /src
# Every dependency ships wheels for CPython 3.11 (uvloop and httptools come with
# uvicorn[standard]), so no compiler is needed.
# requirements.lock: the exact versions the test suite ran on (`make lock`).
COPY pyproject.toml README.md requirements.lock ./
COPY gateway ./gateway
RUN /opt/gateway/bin/pip install --no-cache-dir -c requirements.lock . \
    && /opt/gateway/bin/python -c "import uvloop, httptools, gateway.cli"

# --- runtime: the virtualenv, the settings, a non-root user ----------------------------------
FROM python:3.11-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="canary-gateway" \
      org.opencontainers.image.description="Traffic-splitting and canary-rollout gateway for ML model servers" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric user, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway

ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_CONFIG=/etc/gateway/gateway.yaml

COPY --from=build /opt/gateway /opt/gateway
COPY deploy/docker/gateway.yaml /etc/gateway/gateway.yaml
COPY deploy/docker/flags.yaml /etc/gateway/flags.yaml

# Nothing is written outside /tmp (the read-only root filesystem in deploy/k8s relies on it).
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080 9090

# Liveness on the admin port the settings name (file or GATEWAY_ADMIN__PORT): slim has no curl,
# and a port written here would not follow the settings.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-m", "gateway.healthcheck"]

CMD ["gateway", "serve", "--config", "/etc/gateway/gateway.yaml"]
