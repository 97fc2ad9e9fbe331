# The image every PyTorchJob pod runs: ENTRYPOINT `python -m training` (see `--help`).
#   docker build -t petal:0.1.0 .
#   docker build --build-arg BASE_IMAGE=petal-base:bookworm -t petal:dev .   # the local test bed's base
# The base must provide python with pip; the pinned default brings torch and CUDA (torch 2.12 or later
# lets the launcher give its ranks the pod's grace period after SIGTERM: training/launch.py). HOME is the
# writable cache (an emptyDir in pods): torch hub weights and matplotlib's config land there.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime

# What the trainer needs, read from pyproject.toml (its dependencies and the train extra) in a stage of
# its own: a pyproject change elsewhere (another extra, a tool's settings) leaves this list, and so the
# image's 6 GB dependency layer below, as it was.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /tmp/
RUN python -c 'import tomllib; p = tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]; print(*p["dependencies"], *p["optional-dependencies"]["train"], sep="\n")' > /tmp/requirements.txt

FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PETAL_CACHE_DIR=/cache \
    HOME=/cache

WORKDIR /opt/petal

# Dependencies first, from the list above alone, so neither code changes nor the rest of pyproject.toml
# reinstall them. Versions are pinned where they are declared, in pyproject.toml.
COPY --from=requirements /tmp/requirements.txt ./
RUN pip install -r requirements.txt

COPY pyproject.toml ./
COPY training/ training/
COPY petal/ petal/
COPY charts/petal/ charts/petal/
COPY scripts/predict.py scripts/collect_run.py scripts/versions.env scripts/
COPY manifests/trainer-runtime.yaml manifests/
# README.md is pyproject's readme: an empty stand-in (the image has no use for the text).
RUN touch README.md \
    && pip install --no-deps --force-reinstall . \
    && mkdir -p /cache \
    && chown 10001:10001 /cache

# A UID no host account has (the chart's runAsUser matches it).
USER 10001:10001
ENTRYPOINT ["python", "-m", "training"]
