# The serving image: `optimize serve` on a bundle mounted at /bundle, no PyTorch.
#
#   docker build -t my-model .                       # CPU: ONNX Runtime and OpenVINO
#   docker run -p 8000:8000 -p 8001:8001 -v $PWD/bundle:/bundle:ro my-model   # HTTP and gRPC
#
#   docker build --build-arg REQUIREMENTS=requirements-serve-gpu.txt \
#       --build-arg PIP_EXTRA_INDEX_URL=https://pypi.nvidia.com -t my-model-gpu .
#   docker run --gpus all -p 8000:8000 -v $PWD/bundle:/bundle:ro my-model-gpu   # TensorRT, ONNX Runtime on CUDA
#
# A TensorRT engine runs only on the GPU model and TensorRT version it was built with: build the
# bundle's trt-* targets on the kind of GPU the image will run on.
#
# BASE_IMAGE is any Debian-like image with python3 (3.11+) and its venv module; the default is the
# public slim Python image. Wheels placed in docker/wheels/ are installed without an index (for
# builds without network access); otherwise the index pip is configured with is used.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG REQUIREMENTS=requirements-serve.txt
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
COPY docker/ /src/docker/
RUN python3 -m venv /opt/serve \
 && if ls /src/docker/wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /src/docker/wheels; fi \
 && /opt/serve/bin/pip install "$@" -r "/src/docker/${REQUIREMENTS}"
COPY pyproject.toml README.md /src/
COPY optimize/ /src/optimize/
COPY serve/ /src/serve/
RUN if ls /src/docker/wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /src/docker/wheels; fi \
 && /opt/serve/bin/pip install "$@" --no-deps /src \
 && ! /opt/serve/bin/python -c "import torch" 2>/dev/null

FROM ${BASE_IMAGE}
COPY --from=build /opt/serve /opt/serve
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin serve
USER 10001:10001
ENV PATH=/opt/serve/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["optimize", "serve", "/bundle", "--host", "0.0.0.0", "--http-port", "8000", "--grpc-port", "8001"]
