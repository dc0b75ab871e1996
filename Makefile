# The two commands in the README: `make demo` and `make test`. Both set up a fresh machine first.
VENV := .venv/bin

.PHONY: setup demo test lint export repository serve bench perf clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/python -m medpclip_tools.demo

test: setup
	$(VENV)/ruff check .
	$(VENV)/python -m pytest -q

lint: setup
	$(VENV)/ruff check .

export: setup
	$(VENV)/python -m medpclip.export

# regenerate the committed model_repository/ from the tensor declarations (tests check it)
repository: setup
	$(VENV)/python -m medpclip.repository

serve: export
	$(VENV)/python -m medpclip_tools.serve --repository build/model_repository

clean:
	rm -rf build

bench: setup
	$(VENV)/python perf/benchmark.py

perf: setup
	$(VENV)/python perf/perf_analyzer.py sweep
