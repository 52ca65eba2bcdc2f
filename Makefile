# Two commands do all set-up on a fresh clone (see README.md):
#   make audit   -> creates .venv, installs diffcam, audits the shipped tiny model
#   make test    -> creates .venv, installs diffcam + test tools, runs the whole suite
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

.PHONY: install audit test test-fast
install: $(STAMP)

audit: $(STAMP)
	$(VENV)/bin/diffcam audit

# two pytest workers, a test file each at a time (module fixtures built once); the suite's
# slow tests mostly wait on servers and subprocesses, so two share the 2-core CI machine well
test: $(STAMP)
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"
