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

.PHONY: install audit test test-fast lint typecheck
install: $(STAMP)

audit: $(STAMP)
	$(VENV)/bin/diffcam audit

# two pytest workers, a test file each at a time (module fixtures built once); the suite's
# slow tests mostly wait on servers and subprocesses, so two share the 2-core CI machine well
test: lint typecheck
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# mypy does not run the editable install's import hook, so it reads the `diffcam.*` packages
# through a tree of links built from pyproject's package-dir table (the one mapping).
TYPECHECK := $(VENV)/typecheck
typecheck: $(STAMP)
	rm -rf $(TYPECHECK)/diffcam && mkdir -p $(TYPECHECK)/diffcam
	$(VENV)/bin/python -c "import tomllib, os; m = tomllib.load(open('pyproject.toml', 'rb'))['tool']['setuptools']['package-dir']; \
	  [os.symlink(os.path.abspath(src), os.path.join('$(TYPECHECK)', *name.split('.'))) for name, src in m.items()]"
	cd $(TYPECHECK) && MYPYPATH=. $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"
