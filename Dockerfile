# The image every PyTorchJob pod runs: ENTRYPOINT `python -m training` (see `--help`).
#   docker build -t petal:0.1.0 .
#   docker build --build-arg BASE_IMAGE=petal-base:bookworm -t petal:dev .   # the local test bed's base
# The base must provide python with pip; the pinned default brings torch and CUDA (torch 2.12 or later
# lets the launcher give its ranks the pod's grace period after SIGTERM: training/launch.py). HOME is the
# writable cache (an emptyDir in pods): torch hub weights and matplotlib's config land there.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PETAL_CACHE_DIR=/cache \
    HOME=/cache

WORKDIR /opt/petal

# Dependencies first, from pyproject.toml alone, so code changes do not reinstall them: the README
# (pyproject's readme), the packages and the data files pyproject names are empty stand-ins until
# the real ones are copied below.
COPY pyproject.toml ./
# Versions are pinned where they are declared, in pyproject.toml.
# hadolint ignore=DL3013
RUN mkdir -p training petal charts/petal/templates/tests scripts manifests \
    && touch README.md training/__init__.py petal/__init__.py scripts/versions.env \
        charts/petal/Chart.yaml charts/petal/values.yaml charts/petal/values.schema.json \
        manifests/trainer-runtime.yaml \
    && pip install ".[train]"

COPY training/ training/
COPY petal/ petal/
COPY charts/petal/ charts/petal/
COPY scripts/predict.py scripts/collect_run.py scripts/versions.env scripts/
COPY manifests/trainer-runtime.yaml manifests/
RUN pip install --no-deps --force-reinstall . \
    && mkdir -p /cache \
    && chown 10001:10001 /cache

# A UID no host account has (the chart's runAsUser matches it).
USER 10001:10001
ENTRYPOINT ["python", "-m", "training"]
