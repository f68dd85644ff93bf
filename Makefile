# drp-foundry: one command to set up, one for the main job, one for the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# The corpus of the demos: by default the embedded seven-domain sample (provenance: drp_foundry/demo/corpus/README.md).
CORPUS ?= drp_foundry/demo/corpus
POLICY ?= drpruning

.PHONY: setup demo demo-tiny test test-fast lint

setup:            ## venv + pinned stack + drp-foundry (editable) + SmolLM2 as a local HF directory
	VENV=$(VENV) bash scripts/setup.sh

demo:             ## the main job on CPU: prune SmolLM2-135M -> export -> continued pretraining, per-domain table
	PATH=$(VENV)/bin:$$PATH $(PY) -m drp_foundry.commands.demo --corpus $(CORPUS) --policy $(POLICY)

demo-tiny:        ## a 24-step run of a tiny random Llama on per-domain MDS (a minute)
	$(PY) -m drp_foundry.commands.data_prep --corpus $(CORPUS) --out data/demo-tiny --train-tokenizer 2048 --max-seq-len 128
	$(PY) train.py yamls/demo/tiny_llama.yaml variables.data_root=data/demo-tiny

# One pytest worker per core (at most 4), a test file per worker, the longest files first in the order
# tests/conftest.py gives (--no-loadscope-reorder: xdist would otherwise start the files with the most tests
# first, and the long end-to-end files, which hold one or two tests each, would run last on one worker);
# WORKERS= runs one process. Two jobs that build StreamingDatasets at the same moment on
# one machine could collide in streaming 0.12's shared-memory prefix allocation; our loaders (drp_multidomain,
# drp_text: what drp_domain_evals expands to) and the tests that build one directly take a node-wide lock
# for it (drp_foundry/data/shm_lock.py). Not covered: the stock `text` train loader of one end-to-end test
# (test_domain_eval_loaders, one rank).
WORKERS ?= --numprocesses auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

test:             ## the whole test suite (CPU)
	$(PY) -m pytest -q $(WORKERS) --durations=15

test-fast:        ## without the end-to-end runs
	$(PY) -m pytest -q $(WORKERS) -m "not slow"

lint:
	$(VENV)/bin/ruff check drp_foundry data_prep tests bench train.py
