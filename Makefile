# The whole set-up is `make demo` or `make test`: each (re)creates .venv when it is missing or
# its dependency list changed, then does its job.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-stamp
DEPS   := requirements.txt requirements-lava.txt scripts/patch_lava.py pyproject.toml

.PHONY: demo test venv clean bench

venv: $(STAMP)

$(STAMP): $(DEPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --ignore-requires-python -r requirements-lava.txt
	$(PY) scripts/patch_lava.py
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ftbc-export examples/digits_cnn.pt --target loihi2-sim --data digits --out build/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build
