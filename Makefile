# Two commands: `make demo` runs the LCSC demo, `make test` runs the tests. Each creates .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch; an unpinned torch resolves to a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export OMP_NUM_THREADS := 1

.PHONY: install demo test test-fast test-slow test-extended lint schema clean hf-example

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test]"
	# pytorch-fid's InceptionV3 source checks our FID network in a test; its torchvision dependency cannot
	# be imported beside the CPU torch (and would pull a CUDA build), so it is installed without dependencies.
	$(PY) -m pip install --quiet --no-deps "pytorch-fid==0.3.0"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lcsc_ray demo

# Train your own model: built-in text -> BPE tokenizer -> token file -> random HF Llama config -> CheckFree run
# with a stage killed -> outputs/hf-example/run/hf (examples/train_hf_llama.yaml).
HF_EXAMPLE := outputs/hf-example
hf-example: $(STAMP)
	mkdir -p $(HF_EXAMPLE)/texts
	$(PY) -c "from checkfree_ray.data import load_text_bytes; open('$(HF_EXAMPLE)/texts/python-docs.txt', 'wb').write(load_text_bytes('python-docs'))"
	$(VENV)/bin/checkfree-ray tokenizer train $(HF_EXAMPLE)/texts --out $(HF_EXAMPLE)/tokenizer.json --vocab-size 2048
	$(VENV)/bin/checkfree-ray tokenize $(HF_EXAMPLE)/texts --tokenizer $(HF_EXAMPLE)/tokenizer.json --val-fraction 0.05 --out $(HF_EXAMPLE)/tokens
	$(VENV)/bin/checkfree-ray hf-config $(HF_EXAMPLE)/model --hidden-size 128 --layers 4 --heads 4 --kv-heads 2 --tokenizer $(HF_EXAMPLE)/tokenizer.json
	$(VENV)/bin/checkfree-ray train examples/train_hf_llama.yaml --restart

# `extended` tests are more variants of an end-to-end run whose behaviour faster tests cover (each says which).
# TEST_WORKERS pytest processes (pytest-xdist); the tests of the shared spot cluster run in one of them.
# TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup
test: $(STAMP)
	$(PYTEST) --durations=25 -m "not extended"

test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not extended"

test-slow: $(STAMP)
	$(PYTEST) -m "slow and not extended"

test-extended: $(STAMP)
	$(PYTEST) --durations=25 -m extended

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

schema: $(STAMP)
	$(PY) -m schemas.generate

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
