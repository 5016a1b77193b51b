# make demo: set up .venv and run a real pretraining job end to end (a few minutes on a 2-core CPU).
# make test: set up .venv and run the whole test suite; make test-fast: its unit tier only (no script runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo/work

.PHONY: demo test test-fast bench clean tpu gpu

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) demo/prepare.py $(DEMO)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 XLA_FLAGS=--xla_force_host_platform_device_count=2 \
	$(PY) run_mlm_flax.py --output_dir=$(DEMO)/run --model_type=roberta \
	  --config_name=$(DEMO)/my-roberta --tokenizer_name=$(DEMO)/my-roberta --train_file=$(DEMO)/corpus.txt \
	  --line_by_line --max_seq_length=32 --per_device_train_batch_size=32 --per_device_eval_batch_size=64 \
	  --learning_rate=2e-3 --warmup_steps=100 --weight_decay=0.01 --adam_beta2=0.98 --max_steps=1000 \
	  --logging_steps=100 --eval_steps=500 --save_steps=500 --overwrite_output_dir --resume_from_checkpoint=none \
	  --do_train --do_eval
	HF_HUB_OFFLINE=1 $(PY) demo/check.py $(DEMO)/run $(DEMO)/corpus.txt

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# The edit loop: no training script, no subprocess, no parity (-m parity adds about 5 CPU minutes); tiers: tests/conftest.py.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m unit tests

# On a TPU VM or an NVIDIA GPU machine: .venv with JAX's accelerator build (no test tools).
tpu gpu:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-$@.txt

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_train_step.py --config bert-small

clean:
	rm -rf $(VENV) $(DEMO)
