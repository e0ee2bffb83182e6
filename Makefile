# Two commands for a fresh machine: `make demo` and `make test`. Both bootstrap .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.segability-installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

# torch==2.13.0 first: it is the CPU build kept on disk; a looser pin would pull a CUDA build.
# nnunetv2 and dynamic-network-architectures last and with --no-deps: the latter asks for timm, which
# asks for torchvision, which makes pip replace the CPU torch; nnU-Net inference needs neither (the
# rest of their requirements is the [nnunet] extra).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,lightning,ignite,ray,compress,review,nnunet]"
	$(PY) -m pip install --quiet --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
	$(PY) -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.startswith('2.13.0') else 'an install replaced the pinned torch 2.13.0 with ' + v)"
	touch $(STAMP)

demo: install
	$(VENV)/bin/segability demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/bench_protoseg.py

clean:
	rm -rf $(VENV) build dist *.egg-info
