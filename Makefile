# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv if missing and
# installs the project into it (once: a stamp file makes the second run skip pip).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# pytest workers: 2 cores here; each worker simulates 8 devices (tests/conftest.py).
WORKERS ?= 2

.PHONY: demo test install lock clean

$(STAMP): pyproject.toml requirements-lock.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -c requirements-lock.txt -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m alijax demo --workdir runs/demo

test: $(STAMP)
	$(PY) -m pytest -n $(WORKERS) --nbmake tests notebooks

# Re-pin requirements-lock.txt to what .venv holds now (after changing dependencies).
lock: $(STAMP)
	@{ head -2 requirements-lock.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^-e'; } > requirements-lock.txt.new
	@mv requirements-lock.txt.new requirements-lock.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
