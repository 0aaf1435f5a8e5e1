# Reminder service image: `reminders serve` on port 8080, runs as UID 10001.
# Build: docker build -t reminders:0.1.0 .   (the pyproject version; k8s/setup.sh builds it in minikube)
# Run on the embedded default (SQLite in the /data volume): docker run -p 8080:8080 reminders:0.1.0
# The default target (the last stage) is the production image: the service only, never the fake
# providers (fakes/, whose Telnyx fake signs with a published private key). The demo's image of
# the fake provider is another target:  docker build --target demo -t reminders-demo:0.1.0 .

# --- builder: a self-contained venv with the service and its locked dependencies ------------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The lock first (its layer stays cached while only the code changes): every package pinned and every
# file's hash checked, nothing resolved at build time (requirements/runtime.txt, `make lock`). Every
# dependency ships manylinux wheels for CPython 3.11 (asyncpg, grpcio, ...): no compiler needed.
COPY requirements/runtime.txt requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/runtime.txt
# Then the service from its source: no dependency left to fetch, built by the locked setuptools
# (no isolated build environment that would fetch a backend of its own).
COPY pyproject.toml ./
COPY service/ service/
RUN pip install --no-cache-dir --no-deps --no-build-isolation .

# --- service-venv: the builder's venv without the installers ----------------------------------
FROM builder AS service-venv
# Not needed at run time (~23 MB, and tools for whoever gets a shell).
RUN pip uninstall --yes pip setuptools

# --- demo-builder: the builder's venv plus the fake providers (reminders-fakes) -------------
FROM builder AS demo-builder
COPY fakes/ fakes/
# The fakes' dependencies are the service's, already installed from the lock: their package alone.
RUN pip install --no-cache-dir --no-deps --no-build-isolation ./fakes \
    && pip uninstall --yes pip setuptools

# --- demo: the fake telephony provider for the k8s demo overlay (never the production image) --
FROM python:3.11-slim AS demo

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 reminders \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin reminders

COPY --from=demo-builder /opt/venv /opt/venv
WORKDIR /app
USER 10001:10001
EXPOSE 8090
# The bearer token comes from TELEPHONY_TOKEN (the demo overlay sets it from a Secret).
CMD ["reminders", "fake-provider", "--host", "0.0.0.0", "--port", "8090"]

# --- runtime: the venv, the migrations, nothing else (the default target) ----------------------
FROM python:3.11-slim

# DATABASE_URL: the embedded default of a bare `docker run`, a SQLite file in the /data volume
# (the service's own default, ./reminders.db, would land in the read-only /app). Kubernetes sets
# DATABASE_URL from a Secret (PostgreSQL).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATABASE_URL=sqlite+aiosqlite:////data/reminders.db

RUN groupadd --system --gid 10001 reminders \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin reminders \
    && install -d -o 10001 -g 10001 -m 0750 /data

COPY --from=service-venv /opt/venv /opt/venv

# The service looks for migrations/ in the working directory (`reminders migrate`, schema check).
WORKDIR /app
COPY alembic.ini ./
COPY migrations/ migrations/

# Numeric UID so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# 8080: the API and the providers' webhooks; 9464: /metrics (METRICS_PORT), for Prometheus only.
EXPOSE 8080 9464
# Writable even with a read-only root filesystem (`docker run --read-only` gets an anonymous volume).
VOLUME ["/data"]

# Kubernetes ignores this (it uses the Deployment's probes); plain `docker run` uses it.
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

# Exec form: `reminders` is PID 1 and receives SIGTERM directly (resign, drain, exit).
CMD ["reminders", "serve", "--host", "0.0.0.0", "--port", "8080"]
