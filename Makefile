# cnnserve: the commands a new user needs. `make serve` and `make test` do all the set-up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
FASHION_DIR := /usr/share/datasets/fashion-mnist
TRAINED := lenet5 alexnet googlenet resnet

.PHONY: help serve test lint format install install-dev dataset tools models train export schema bench bench-gpu soak overload cycles clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $@ $(VENV)/.serve

install: $(VENV)/.serve  ## install the service (no torch)
install-dev: $(VENV)/.dev  ## install the service, training and test tools

serve: $(VENV)/.serve  ## serve models/ on http://127.0.0.1:8000
	$(BIN)/python -m app serve --host $(HOST) --port $(PORT)

dataset:  ## install Fashion-MNIST from Debian (needs root)
	@test -d $(FASHION_DIR) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

tools:  ## install Debian's chromium (the page test) and wrk (the benchmark) if missing (needs root)
	@command -v chromium >/dev/null && command -v wrk >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium wrk; }

test: $(VENV)/.dev dataset tools  ## run the test suite: the service's tests with torch blocked, then training and deployment
	$(BIN)/python -m pytest -q -p tests.torchless tests/app
	$(BIN)/python -m pytest -q tests/training tests/test_deploy.py tests/test_k8s.py

lint: $(VENV)/.dev  ## ruff check and format check, hadolint on the Dockerfile
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

bench: $(VENV)/.dev dataset tools  ## three deployments (serve; 1 process on 1 core; 1 on all cores) against a FastAPI peer and bare ONNX Runtime, and the goals met or missed (about 8 min)
	$(BIN)/python -m bench.run

bench-gpu: $(VENV)/.dev  ## on an NVIDIA GPU with onnxruntime-gpu: every model on CUDA, answers equal to the CPU's, the data plane at 1/8/32 at once (a few min)
	$(BIN)/python -m bench.gpu --out bench/results/gpu.json

soak: $(VENV)/.dev dataset  ## 50,000 mixed requests; resident-memory growth over the last 20,000 (about 3 min)
	$(BIN)/python -m bench.stress soak --out bench/results/soak.json

overload: $(VENV)/.dev dataset  ## 64 clients sending 12-megapixel photos for 30 s
	$(BIN)/python -m bench.stress overload --out bench/results/overload.json

cycles: $(VENV)/.dev dataset  ## 50 unload/load cycles of EfficientNet-Lite0 through the repository API; resident-memory growth (about 3 min)
	$(BIN)/python -m bench.stress cycles --cycles 50 --model efficientnet_lite0 --out bench/results/cycles.json

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

train: $(VENV)/.dev dataset  ## train the four Fashion-MNIST networks (about 50 min on 2 cores)
	$(BIN)/python -m training.train --arch lenet5 --epochs 40 --lr 3e-3
	$(BIN)/python -m training.train --arch alexnet --epochs 15
	$(BIN)/python -m training.train --arch googlenet --epochs 18
	$(BIN)/python -m training.train --arch resnet --epochs 24

export: $(VENV)/.dev dataset  ## export every model into models/, checked against PyTorch
	for arch in $(TRAINED) kernels efficientnet_lite0; do $(BIN)/python -m training.export --arch $$arch || exit 1; done

models: train export  ## rebuild models/ from scratch: train, then export

schema: $(VENV)/.serve  ## regenerate models/model.schema.json from app/serving/spec.py
	$(BIN)/python -m app.serving.spec > models/model.schema.json

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
