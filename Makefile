# Quick start:  make demo   |   make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench chaos clean

# C libraries the data plane links (migrate/dataplane/_build.py), as Debian packages
DEB_DEPS := libssl-dev libzstd-dev libxxhash-dev zlib1g-dev

$(STAMP): pyproject.toml setup.py migrate/kvm/_build.py migrate/guest/_build_check.py migrate/stream/_build_pages.py migrate/stream/crc32_fold.h migrate/kvm/runloop.c migrate/kvm/capture.c migrate/dataplane/_build.py migrate/dataplane/dataplane.c $(wildcard migrate/guest/src/* migrate/stub/src/*)
	dpkg -s $(DEB_DEPS) >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq $(DEB_DEPS) >/dev/null) || \
		{ echo "setup: install $(DEB_DEPS) (Debian packages) and run make again"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m compileall -q migrate >/dev/null    # every hvm command and domain process starts ~0.1 s sooner, also where PYTHONDONTWRITEBYTECODE is set
	touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/hvm demo

test: setup
	$(PY) -m pytest -q

chaos: setup    # fault injection: 200 relocations and saves, one fault each (tools/chaos.py)
	$(PY) tools/chaos.py --trials 200

clean:
	rm -rf $(VENV) build *.egg-info migrate/kvm/_kvm.*.so migrate/kvm/_kvm.c migrate/kvm/_kvm.o migrate/stream/_pages.*.so migrate/stream/_pages.c migrate/stream/_pages.o migrate/dataplane/_dataplane.*.so migrate/dataplane/_dataplane.c migrate/dataplane/_dataplane.o
	$(MAKE) -C migrate/guest clean
	$(MAKE) -C migrate/stub clean
