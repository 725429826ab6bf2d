# Quick start:  make demo   |   make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml setup.py migrate/kvm/_build.py migrate/guest/_build_check.py migrate/stream/_build_pages.py migrate/kvm/runloop.c $(wildcard migrate/guest/src/* migrate/stub/src/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/hvm demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info migrate/kvm/_kvm.*.so migrate/kvm/_kvm.c migrate/kvm/_kvm.o migrate/stream/_pages.*.so migrate/stream/_pages.c migrate/stream/_pages.o
	$(MAKE) -C migrate/guest clean
	$(MAKE) -C migrate/stub clean
