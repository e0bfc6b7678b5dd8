# One image for the EPP (`epp serve`) and the mock vLLM servers (`epp sim`).
# Envoy runs from the official envoyproxy/envoy image (see docker-compose.yml).
#
#   docker build -t epp:local .
#   docker run --rm epp:local --help
#
# PYTHON_IMAGE: any Debian-based image with python/pip 3.11+ on PATH. The default is the official
# one; `make compose-test` passes a local stand-in built without a registry (deploy/README.md).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so editing the code does not reinstall them.
COPY pyproject.toml README.md ./
COPY epp/__init__.py epp/__init__.py
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY epp ./epp
COPY plugins ./plugins
COPY config ./config
RUN pip install --no-deps . && epp --help > /dev/null

# An unprivileged user; the EPP and the sims only bind unprivileged ports.
RUN useradd --system --uid 10001 --no-create-home epp
USER 10001

# 9002 ext_proc gRPC, 9003 gRPC health, 9090 metrics + /debug, 8000 a mock vLLM server
EXPOSE 9002 9003 9090 8000
ENTRYPOINT ["epp"]
CMD ["serve", "--help"]
