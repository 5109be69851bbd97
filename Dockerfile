# syntax=docker/dockerfile:1
# One image for every component; the command picks it:
#   docker run IMAGE tracker | aggregator | operator | proxy | migrate | up
# Build: docker build -t ghcr.io/mailbeacon/mailbeacon:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the project and its dependencies into a virtual environment ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/mailbeacon
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mailbeacon/ mailbeacon/
COPY smtp_proxy/ smtp_proxy/
COPY tracker/ tracker/
COPY aggregator/ aggregator/
COPY operator/ operator/
# A regular (not editable) install: the venv holds the packages; /src is left behind.
RUN /opt/mailbeacon/bin/pip install . \
    && /opt/mailbeacon/bin/python -m compileall -q /opt/mailbeacon/lib

# --- runtime: the virtual environment only, run by an unprivileged user ---
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mailbeacon" \
      org.opencontainers.image.description="Email delivery tracking: SMTP proxy, tracker, aggregator, Campaign operator" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 mailbeacon \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin mailbeacon
COPY --from=build /opt/mailbeacon /opt/mailbeacon
ENV PATH=/opt/mailbeacon/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MAILBEACON_DATA_DIR=/tmp/mailbeacon
# The root filesystem can be read-only: components write only below /tmp.
WORKDIR /tmp
USER 10001:10001
# SMTP (proxy), proxy health/metrics, tracker, aggregator, operator health/metrics.
EXPOSE 2525 8025 8080 8090 8070
ENTRYPOINT ["mailbeacon"]
CMD ["--help"]
