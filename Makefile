# cnnserve: the commands a new user needs. `make serve` and `make test` do all the set-up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
FASHION_DIR := /usr/share/datasets/fashion-mnist
DIGITS_PNG := /usr/share/doc/opencv-doc/examples/data/digits.png
TRAINED := lenet5 alexnet googlenet resnet
# tests/test_k8s.py: the KServe SDK's models (installed without the SDK's server dependencies, which
# would pull pandas and grpcio-tools and downgrade python-dateutil), and checkov in a venv of its own
# (it pins networkx, packaging and python-dateutil below what torch and scikit-image need). Pinned,
# so the schema and the set of checks are fixed.
KSERVE_VERSION := 0.21.0
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV := .venv-checkov
CHECKOV := $(CHECKOV_VENV)/.checkov-$(CHECKOV_VERSION)

.PHONY: help serve test lint format install install-dev dataset tools models train export schema grpc bench bench-gpu bench-grpc bench-ray soak overload cycles clean image test-image image-arm64 lock container-tools

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,dev,ray]'
	$(BIN)/pip install -q --no-deps kserve==$(KSERVE_VERSION)
	touch $@ $(VENV)/.serve

$(CHECKOV):
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q checkov==$(CHECKOV_VERSION)
	touch $@

install: $(VENV)/.serve  ## install the service (no torch)
install-dev: $(VENV)/.dev $(CHECKOV)  ## install the service, training and test tools

serve: $(VENV)/.serve  ## serve models/ on http://127.0.0.1:8000
	$(BIN)/python -m app serve --host $(HOST) --port $(PORT)

dataset:  ## install Fashion-MNIST and OpenCV's handwritten digits (opencv-doc: 96 MB download) from Debian (needs root)
	@test -d $(FASHION_DIR) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }
	@test -f $(DIGITS_PNG) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends opencv-doc; }

tools:  ## install Debian's chromium (the page test), wrk (the benchmark), podman & co (the image's tests) if missing (needs root)
	@command -v chromium >/dev/null && command -v wrk >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium wrk; }
	@$(MAKE) --no-print-directory container-tools || echo "podman could not be installed: tests/test_image.py will be skipped"

# podman with runc (crun refuses hybrid cgroups) and debootstrap for the stand-in base (deploy/image.sh);
# podman-compose comes from PyPI with the dev extra.
container-tools:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman runc debootstrap; }

test: $(VENV)/.dev $(CHECKOV) dataset tools  ## run the test suite: the service's tests with torch blocked, then training, deployment (the cpu image built and run too) and a two-node Ray cluster
	$(BIN)/python -m pytest -q -p tests.torchless tests/app
	$(BIN)/python -m pytest -q tests/training tests/test_deploy.py tests/test_k8s.py tests/test_ray.py tests/test_ray_access.py tests/test_image.py

lint: $(VENV)/.dev  ## ruff check and format check, hadolint on the Dockerfile
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

bench: $(VENV)/.dev dataset tools  ## three deployments (serve; 1 process on 1 core; 1 on all cores) against a FastAPI peer and bare ONNX Runtime, and the goals met or missed (about 8 min)
	$(BIN)/python -m bench.run

bench-ray: $(VENV)/.dev tools  ## Ray Serve (ours and @serve.batch batching) against the native server, small JPEG at 1 and 8 connections (about 4 min)
	$(BIN)/python -m bench.ray --out bench/results/ray.json

bench-gpu: $(VENV)/.dev  ## on an NVIDIA GPU with onnxruntime-gpu: every model on CUDA, answers equal to the CPU's, both GPU deployments over HTTP at 1/8/32/128 connections against the GPU limit and the decode ceiling (about 5 min; PROVIDERS=cpu runs it without a GPU)
	$(BIN)/python -m bench.gpu --providers $(or $(PROVIDERS),cuda) --seconds 5 --out bench/results/gpu.json

soak: $(VENV)/.dev dataset  ## 50,000 mixed requests; resident-memory growth over the last 20,000 (about 3 min)
	$(BIN)/python -m bench.stress soak --out bench/results/soak.json

overload: $(VENV)/.dev dataset  ## 64 clients sending 12-megapixel photos for 30 s
	$(BIN)/python -m bench.stress overload --out bench/results/overload.json

cycles: $(VENV)/.dev dataset  ## 50 unload/load cycles of EfficientNet-Lite0 through the repository API; resident-memory growth (about 3 min)
	$(BIN)/python -m bench.stress cycles --cycles 50 --model efficientnet_lite0 --out bench/results/cycles.json

bench-grpc: $(VENV)/.dev dataset tools  ## gRPC against HTTP binary V2 (one 224x224 tensor, 1 and 8 clients), then the CPU of a LeNet-5 request with traces off and on (about 6 min)
	$(BIN)/python -m bench.grpc_vs_http --out bench/results/grpc.json protocols --seconds 6 --clients 1,8 --rounds 3
	$(BIN)/python -m bench.grpc_vs_http --out bench/results/tracing.json cpu --requests 2000 --rounds 5

image: container-tools  ## build the cpu image as cnnserve:cpu with docker or podman (deploy/image.sh; a stand-in base where no registry answers)
	bash deploy/image.sh build cpu

test-image: $(VENV)/.dev container-tools  ## build the cpu image, run it as production would, stop it, look inside, compose up and down (about 3 min)
	$(BIN)/python -m pytest -q tests/test_image.py

image-arm64: $(VENV)/.dev container-tools  ## the cpu image for linux/arm64 under qemu-user-static, built, run once and sent a photo (slow; not in make test)
	PHOTO=$$($(BIN)/python -c 'from training.photos import sample_photos; print(sample_photos()["chelsea"])') bash deploy/image.sh arm64

lock: $(VENV)/.dev  ## regenerate the images' lock files with hashes (requirements/*.txt) from pyproject.toml
	$(BIN)/python requirements/lock.py

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

train: $(VENV)/.dev dataset  ## train the four Fashion-MNIST networks and LeNet-5 on handwritten digits (about 52 min on 2 cores)
	$(BIN)/python -m training.train --arch lenet5 --epochs 40 --lr 3e-3
	$(BIN)/python -m training.train --arch alexnet --epochs 15
	$(BIN)/python -m training.train --arch googlenet --epochs 18
	$(BIN)/python -m training.train --arch resnet --epochs 24
	$(BIN)/python -m training.digits_train --epochs 40 --seed 1

export: $(VENV)/.dev dataset  ## export every model into models/, checked against PyTorch; then what excites each channel
	for arch in $(TRAINED) lenet5_digits kernels efficientnet_lite0; do $(BIN)/python -m training.export --arch $$arch || exit 1; done
	$(BIN)/python -m training.exemplars --arch all

models: train export  ## rebuild models/ from scratch: train, then export

schema: $(VENV)/.serve  ## regenerate models/model.schema.json from app/serving/spec.py
	$(BIN)/python -m app.serving.spec > models/model.schema.json

# The messages' classes go into a descriptor pool of their own, not protobuf's default one, where
# tritonclient.grpc (and KServe's SDK) register the same `inference.*` names: both in one process
# (a test, a client beside the server) would otherwise refuse to import.
grpc: $(VENV)/.dev  ## regenerate app/grpc/inference_pb2.py and .pyi from app/grpc/inference.proto (grpcio-tools)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. app/grpc/inference.proto
	sed -i 's/_descriptor_pool.Default()/_descriptor_pool.DescriptorPool()/' app/grpc/inference_pb2.py

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) runs .pytest_cache .ruff_cache *.egg-info
