# Two entry points: `make demo` runs the main job, `make test` runs the suite. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install shell clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml constraints.txt
	$(BIN)/pip install -c constraints.txt -e '.[test,serve]'
	# export-triton's config check: tritonclient's generated protobuf module only (its grpc
	# extra pins protobuf < 7, its base ml-dtypes <= 0.5.4: neither is needed for that)
	$(BIN)/pip install -c constraints.txt --no-deps tritonclient
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m detdeploy.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# An interactive shell with .venv/bin first on PATH, so `detdeploy` works; `exit` leaves it.
shell: $(STAMP)
	@echo "detdeploy is on PATH in this shell ($(abspath $(BIN))); type exit to leave"
	@PATH="$(abspath $(BIN)):$$PATH" VIRTUAL_ENV="$(abspath $(VENV))" $${SHELL:-/bin/sh} -i

clean:
	rm -rf $(VENV) build *.egg-info
