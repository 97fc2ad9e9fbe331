# The image every PyTorchJob pod runs: ENTRYPOINT `python -m training` (see `--help`).
#   docker build -t petal:0.1.0 .
#   docker build --build-arg BASE_IMAGE=petal-base:bookworm -t petal:dev .   # the local test bed's base
# The base must provide python with pip; the pinned default brings torch and CUDA. HOME is the
# writable cache (an emptyDir in pods): torch hub weights and matplotlib's config land there.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PETAL_CACHE_DIR=/cache \
    HOME=/cache

WORKDIR /opt/petal

# Dependencies first, from pyproject.toml alone, so code changes do not reinstall them: the README
# (pyproject's readme) and the package are empty stand-ins until the real ones are copied below.
COPY pyproject.toml ./
# Versions are pinned where they are declared, in pyproject.toml.
# hadolint ignore=DL3013
RUN mkdir training \
    && touch README.md training/__init__.py \
    && pip install ".[train]"

COPY training/ training/
COPY scripts/predict.py scripts/collect_run.py scripts/
RUN pip install --no-deps --force-reinstall . \
    && mkdir -p /cache \
    && chown 1000:1000 /cache

USER 1000:1000
ENTRYPOINT ["python", "-m", "training"]
