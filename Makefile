# Everything a newcomer needs: `make demo` (main job) and `make test` (house style with ruff, then the
# test suite); `make test-fast` leaves out the ruff step and the tests marked slow or realdata, for the
# edit-test loop (CI runs the full `make test`). `make format` applies the house style.
# torch is installed first and pinned to the CPU build that this project is developed on;
# installing the package afterwards finds it already satisfied.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
OUT    ?= runs/demo

.PHONY: install demo lint format test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/smartformer demo --out $(OUT)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not realdata"

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
