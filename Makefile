# The README's two commands: `make demo` (the tiny end-to-end pipeline on CPU) and `make test`.
PY ?= python

.PHONY: install demo demo-smoke test

install:
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"

demo: install
	$(PY) -m megatron_xomni.cli demo --out runs/demo --publish reports/tiny_demo

demo-smoke: install
	$(PY) -m megatron_xomni.cli demo --out runs/demo-smoke --smoke

test:
	$(PY) -m pytest -q
