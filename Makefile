# The two entry points of the README. Both set everything up on a fresh machine.
VENV ?= .venv
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS = 1

.PHONY: setup quickstart test report sweep paper

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh && touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(VENV)/bin/fusionbench run experiments/quickstart.yaml

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

report: setup
	$(VENV)/bin/fusionbench report

# the paper's main results (resumable: finished points are skipped), then figures, tables and PDF
sweep: setup
	$(VENV)/bin/fusionbench sweep experiments/main.yaml

paper: report
	cd paper && latexmk -pdf -interaction=nonstopmode -halt-on-error main.tex
