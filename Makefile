# fcnify: `make demo` and `make test` each do all set-up on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo eval lint bench clean samples train

install: $(STAMP)

# Re-install only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The build backend's notes go to a log, shown only when the install fails.
	$(BIN)/python -m pip install --quiet --upgrade pip > $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	$(BIN)/python -m pip install --quiet -e '.[dev]' >> $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	touch $(STAMP)

# Everything (what CI runs), with the slowest tests listed.
test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile -q --durations=15

# For daily work: no model-zoo sweep, no Ray, no slow or GPU marks.
test-fast: install
	$(BIN)/python -m pytest -n 2 --dist loadfile -q -m "not slow and not ray and not gpu" --durations=5

demo: install
	$(BIN)/fcnify heatmap sample_images/digits_scene_*.png -o out
	@echo "Heatmaps, class panels and score maps are in $(CURDIR)/out/"

eval: install
	$(BIN)/python -m fcnify.zoo.evaluate_digits

train: install
	$(BIN)/python -m fcnify.zoo.train_digits

samples: install
	$(BIN)/python tools/make_sample_images.py

lint: install
	$(BIN)/ruff check fcnify tests benchmarks tools

bench: install
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf out fcnify-out .pytest_cache
