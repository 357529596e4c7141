# The two entry points of the README. Both set everything up on a fresh machine, from requirements.lock.
VENV ?= .venv
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS = 1

.PHONY: setup quickstart test report sweep paper lock test-latest study-gpu

$(VENV)/.installed: requirements.lock pyproject.toml scripts/setup.sh
	bash scripts/setup.sh && touch $@

setup: $(VENV)/.installed

# your rows go to results/local/quickstart.jsonl (git-ignored); the reference rows are results/quickstart.jsonl
quickstart: setup
	$(VENV)/bin/fusionbench run experiments/quickstart.yaml

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# REPORT=committed (default): results/*.jsonl -> paper/ (the committed figures and tables), and
# results/power.md (its check reads the study's own rows)
# REPORT=local: results/local/*.jsonl -> paper/local/; REPORT=both: the two together -> paper/local/
REPORT ?= committed
REPORT_ARGS_committed = --results results --paper paper
REPORT_ARGS_local = --results results/local --paper paper/local
REPORT_ARGS_both = --results results --results results/local --paper paper/local
report: setup
	$(if $(REPORT_ARGS_$(REPORT)),,$(error REPORT must be committed, local or both, not '$(REPORT)'))
	$(VENV)/bin/fusionbench report $(REPORT_ARGS_$(REPORT))
	$(if $(filter committed,$(REPORT)),$(VENV)/bin/fusionbench power)

# the paper's main results (resumable: finished points are skipped); `make report` then writes figures and tables
sweep: setup
	$(VENV)/bin/fusionbench sweep experiments/main.yaml

# the study at GPU scale (experiments/main_gpu.yaml, 5 seeds, bf16) + GPU efficiency + report
study-gpu: setup
	bash scripts/study_gpu.sh

paper: report
	cd paper && latexmk -pdf -interaction=nonstopmode -halt-on-error main.tex

# regenerate requirements.lock (LOCK_DATE=YYYY-MM-DD: PyPI as of that day); then `make test`, commit
lock:
	bash scripts/lock.sh

# the suite against the newest releases pyproject.toml allows (own venv; not CI's default path)
test-latest:
	FUSIONBENCH_VENV=.venv-latest FUSIONBENCH_UNLOCKED=1 bash scripts/setup.sh
	FUSIONBENCH_UNLOCKED=1 .venv-latest/bin/python -m pytest -q $(PYTEST_ARGS)
