# vitscope: `make install`, then `make demo` (offline, CPU) or the real thing on a GPU node:
#   make download URLS=laion-part-00000.parquet   make cache LAYERS=2,5,8,11,14,17,20,22
SHELL := /bin/bash
PY := .venv/bin/python
VITSCOPE := .venv/bin/vitscope
export NO_ALBUMENTATIONS_UPDATE := 1

# CPU machines: the smallest torch/torchvision pair on local disk (see README "Install").
# GPU nodes: make install TORCH="torch torchvision"
TORCH ?= torch==2.13.0 torchvision==0.28.0
URLS ?= data/urls.parquet
SHARDS ?= data/shards
CACHE ?= data/cache
LAYERS ?= 2,5,8,11,14,17,20,22
MODEL ?= ViT-L-14
PRETRAINED ?= laion2b_s32b_b82k
CACHE_FLAGS ?=
LAYER ?= 20
RUN ?= runs/layer$(LAYER)
TRAIN_FLAGS ?=
SWEEP ?= sweep.toml
# NPROC=8: run the cache and train steps under torchrun, one process per GPU (README "Running at scale")
NPROC ?=
LAUNCH := $(if $(NPROC),.venv/bin/torchrun --standalone --nproc-per-node $(NPROC) -m vitscope,$(VITSCOPE))

.PHONY: install browser download cache train sweep demo test bench lint

install: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q $(TORCH)
	.venv/bin/pip install -q -e ".[dev]"
	touch $@

# The browser tests drive Debian's Chromium and its driver (tests/conftest.py: /usr/bin) through
# Selenium: installed from apt when either is missing (as root, else through sudo), else nothing.
browser:
	@[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || { \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get install -y -qq chromium chromium-driver \
		|| { $$sudo apt-get update -qq && $$sudo apt-get install -y -qq chromium chromium-driver; }; }

download: install
	$(VITSCOPE) download --url-list $(URLS) --out $(SHARDS) --url-col URL --caption-col TEXT

cache: install
	$(LAUNCH) cache --shards $(SHARDS) --out $(CACHE) --layers $(LAYERS) \
		--model $(MODEL) --pretrained $(PRETRAINED) $(CACHE_FLAGS)
	$(VITSCOPE) cache-info $(CACHE)

train: install
	$(LAUNCH) train --cache $(CACHE) --layer $(LAYER) --out $(RUN) $(TRAIN_FLAGS)

sweep: install
	$(VITSCOPE) sweep $(SWEEP)

demo: install
	$(VITSCOPE) demo

# Two pytest-xdist workers, one torch thread each (tests/conftest.py): 0.62 of the serial time on 2 cores.
test: install browser
	.venv/bin/pytest -q -n 2

bench: install
	$(PY) bench/cache_throughput.py
	$(PY) bench/codecs.py
	$(PY) bench/train_step.py
	$(PY) bench/train_throughput.py

lint: install
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
