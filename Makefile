# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse, in seconds) the environment in $(VENV) first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: env demo test test-fast clean-env wheelhouse

env:
	VENV=$(abspath $(VENV)) bash tools/setup_env.sh

demo: env
	$(PY) tools/demo.py $(DEMO_ARGS)

# pytest's exit code 5 means "no tests collected" (e.g. a -m filter that matches nothing): reported, not failed.
test: env
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-fast: env
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)

# Offline wheelhouse (tools/wheelhouse.py): every package beyond torch in one folder for `pip --no-index`
# (tools/install_offline.sh DIR installs it). For the GPU node: make wheelhouse WHEELHOUSE_ARGS=--gpu-node
WHEELHOUSE ?= wheelhouse
WHEELHOUSE_ARGS ?= --provided scipy
wheelhouse: env
	$(PY) tools/wheelhouse.py --dest $(WHEELHOUSE) $(WHEELHOUSE_ARGS)
