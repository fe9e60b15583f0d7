# Consent gateway image: `consent-gateway serve` on 8080 (FHIR) and 9090 (admin).
#
#   docker build -t consent-gateway .
#   docker run -p 8080:8080 -p 9090:9090 -e GATEWAY_UPSTREAM__URL=http://fhir:8080/fhir \
#       -v gateway-audit:/var/lib/consent-gateway consent-gateway
#
# Configuration: a YAML file at /etc/consent-gateway/gateway.yaml (mount your own over the
# default written below) and GATEWAY_<SECTION>__<KEY> environment variables, which win over
# the file. Secrets (vendor API keys named by consent.source_api_key_env) come in as env.

# Both stages use the same base so the virtualenv built in the first runs unchanged in the second.
FROM python:3.11.14-slim-trixie AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# Every runtime dependency has a binary wheel; the one C source of the project, the answer
# reader gateway/core/_native.c, is built by gcc here when Debian's package index can give it
# (NATIVE=0 skips it). Without a compiler the wheel leaves the extension out and the gateway
# runs its Python path, the reference (README "Native reader"). The builder stage keeps the
# compiler, pip's build tooling and the source tree out of the final image.
ARG NATIVE=1
# hadolint ignore=DL3008
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install pip==25.3 \
 && if [ "$NATIVE" = 1 ]; then \
        if apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev; then \
            echo "C compiler installed: the native reader is built"; \
        else \
            echo "no C compiler: the wheel runs the Python path"; \
        fi; \
        rm -rf /var/lib/apt/lists/*; \
    fi

# The dependency pins live in pyproject.toml; pip installs exactly those versions. The wheel
# carries the label rules (rules/ becomes the package data gateway/bundled_rules, see setup.py),
# so the default sensitivity.rules_dir works with no setting at all.
COPY pyproject.toml setup.py README.md ./
COPY gateway/ gateway/
COPY rules/ rules/
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /tmp/wheels . \
 && /opt/venv/bin/pip install /tmp/wheels/consent_gateway-*.whl


FROM python:3.11.14-slim-trixie

LABEL org.opencontainers.image.title="consent-gateway" \
      org.opencontainers.image.description="Consent-enforcing reverse proxy for FHIR R4 servers"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed numeric UID lets Kubernetes check runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/consent-gateway /var/lib/consent-gateway \
 && chown 10001:10001 /var/lib/consent-gateway

# Defaults for a container: both ports on all interfaces (the container's network namespace
# is the boundary; publish the admin port only where Prometheus needs it) and the break-glass
# audit log on the volume. upstream.url is left to GATEWAY_UPSTREAM__URL or a mounted file;
# without it start-up stops with one line naming the key.
RUN printf '%s\n' \
        'listen: {host: 0.0.0.0, port: 8080}' \
        'admin: {host: 0.0.0.0, port: 9090}' \
        'audit: {path: /var/lib/consent-gateway/audit.jsonl}' \
        > /etc/consent-gateway/gateway.yaml

COPY --from=builder /opt/venv /opt/venv

# The break-glass audit log must outlive the container.
VOLUME ["/var/lib/consent-gateway"]

USER 10001:10001
WORKDIR /var/lib/consent-gateway

EXPOSE 8080 9090

# The slim image has no curl; python's urllib is there. urlopen raises on any non-2xx answer
# or refused connection, which exits non-zero. The port follows GATEWAY_ADMIN__PORT if set.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GATEWAY_ADMIN__PORT', '9090') + '/healthz', timeout=4)"]

ENTRYPOINT ["consent-gateway"]
CMD ["serve", "--config", "/etc/consent-gateway/gateway.yaml"]
