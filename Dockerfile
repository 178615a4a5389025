# cnnserve images, from one file:
#   docker build --target cpu -t cnnserve:cpu .    the CPU image (python slim, onnxruntime)
#   docker build --target gpu -t cnnserve:gpu .    the GPU image (NVIDIA CUDA 13 + cuDNN 9, onnxruntime-gpu)
# The runtime stages hold the service, ONNX Runtime and models/: no torch, no compilers, no pip, no pip cache.
# models/ is committed, so no stage trains. A build stage installs the locked packages
# (requirements/*.txt, `make lock`) with --require-hashes into a virtual environment without pip,
# builds the cnnserve wheel with the locked setuptools, and writes a CycloneDX SBOM of that
# environment (/usr/share/doc/cnnserve/sbom.cdx.json in the image). deploy/image.sh builds either
# image with docker or podman, and on a stand-in base where no registry can be reached.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu 1.27 and later are built for CUDA 13 and cuDNN 9: this base carries both.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# checkov:skip=CKV_DOCKER_7:The FROM lines name the ARGs above, whose defaults carry release tags (tests/test_deploy.py checks them); checkov does not resolve ARGs and takes an unresolved one for latest
FROM ${PYTHON_IMAGE} AS cpu-build
COPY requirements/build.txt requirements/image.txt /src/requirements/
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --require-hashes -r /src/requirements/build.txt \
    && python -m venv --without-pip /opt/venv \
    && /opt/build/bin/pip --python /opt/venv/bin/python install --no-cache-dir --require-hashes \
        -r /src/requirements/image.txt
COPY pyproject.toml README.md /src/
COPY app /src/app
COPY training /src/training
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /tmp/wheel /src \
    && /opt/build/bin/pip --python /opt/venv/bin/python install --no-cache-dir --no-deps /tmp/wheel/*.whl \
    && /opt/build/bin/pip --python /opt/venv/bin/python check \
    && mkdir -p /sbom \
    && /opt/build/bin/cyclonedx-py environment --pyproject /src/pyproject.toml --output-format JSON \
        --output-file /sbom/sbom.cdx.json /opt/venv

FROM ${CUDA_IMAGE} AS gpu-build
# Ubuntu's python3 (3.12; requirements/image-gpu.txt is locked for it) is not pinned to a point
# release: the archive drops old ones, which would break the build; the CUDA base tag already fixes
# the distribution release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY requirements/build.txt requirements/image-gpu.txt /src/requirements/
# The same packages as the cpu image's, with onnxruntime-gpu in place of onnxruntime.
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --require-hashes -r /src/requirements/build.txt \
    && python3 -m venv --without-pip /opt/venv \
    && /opt/build/bin/pip --python /opt/venv/bin/python install --no-cache-dir --require-hashes \
        -r /src/requirements/image-gpu.txt
COPY pyproject.toml README.md /src/
COPY app /src/app
COPY training /src/training
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /tmp/wheel /src \
    && /opt/build/bin/pip --python /opt/venv/bin/python install --no-cache-dir --no-deps /tmp/wheel/*.whl \
    && mkdir -p /sbom \
    && /opt/build/bin/cyclonedx-py environment --pyproject /src/pyproject.toml --output-format JSON \
        --output-file /sbom/sbom.cdx.json /opt/venv

FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 cnnserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin cnnserve
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=cpu-build /sbom/sbom.cdx.json /usr/share/doc/cnnserve/sbom.cdx.json
COPY models /srv/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    CNNSERVE_MODELS_DIR=/srv/models \
    CNNSERVE_HOST=0.0.0.0 \
    CNNSERVE_PORT=8000 \
    CNNSERVE_GRPC_PORT=8001 \
    CNNSERVE_PROVIDERS=cpu \
    CNNSERVE_DRAIN_SECONDS=5
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["cnnserve", "probe", "/healthz"]
CMD ["cnnserve", "serve"]

FROM ${CUDA_IMAGE} AS gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 cnnserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin cnnserve
COPY --from=gpu-build /opt/venv /opt/venv
COPY --from=gpu-build /sbom/sbom.cdx.json /usr/share/doc/cnnserve/sbom.cdx.json
COPY models /srv/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    CNNSERVE_MODELS_DIR=/srv/models \
    CNNSERVE_HOST=0.0.0.0 \
    CNNSERVE_PORT=8000 \
    CNNSERVE_GRPC_PORT=8001 \
    CNNSERVE_PROVIDERS=cuda \
    CNNSERVE_MAX_BATCH_SIZE=32 \
    CNNSERVE_DRAIN_SECONDS=5
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["cnnserve", "probe", "/healthz"]
CMD ["cnnserve", "serve"]
