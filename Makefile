# The README's two commands: `make demo` (the tiny end-to-end pipeline on CPU) and `make test`.
PY ?= python

.PHONY: install demo demo-smoke scaling test

install:
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"

demo: install
	$(PY) -m megatron_xomni.cli demo --out runs/demo --publish reports/tiny_demo

demo-smoke: install
	$(PY) -m megatron_xomni.cli demo --out runs/demo-smoke --smoke

# A real iso-FLOP sweep (4 sizes x 3 budgets) on the built-in world on CPU; reuses runs/demo/tokens.
scaling: install
	$(PY) -m megatron_xomni.cli scaling tiny --out runs/scaling_tiny

test:
	$(PY) -m pytest -q
