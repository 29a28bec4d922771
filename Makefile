# Two commands for a fresh machine: `make demo` (the main job on the sample scene) and
# `make test`. Both create .venv on first use (torch is capped by .ci/constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
CROSSEARTH := $(VENV)/bin/crossearth
DEMO_OUT ?= out

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c .ci/constraints.txt -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(CROSSEARTH) segment sample_data/rgbn_town.tif -o $(DEMO_OUT)/rgbn_town_classes.tif \
		--model potsdam-irrg --allow-random-weights --overwrite \
		--confidence $(DEMO_OUT)/rgbn_town_confidence.tif \
		--vector $(DEMO_OUT)/rgbn_town.gpkg
	@echo "outputs in $(DEMO_OUT)/ (open them in QGIS)"

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist worksteal

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
