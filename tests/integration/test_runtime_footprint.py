"""A device needs numpy, onnxruntime and tokenizers only: the runtime generates with torch unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_runtime_generates_without_torch_or_transformers(tiny_exports):
    folder = tiny_exports("mixtral")
    script = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from moedge.runtime import OrtCausalLM, greedy
        from moedge.tokenizer import load_tokenizer
        lm = OrtCausalLM({str(folder)!r})
        tok = load_tokenizer(lm.info.tokenizer_file)
        new = greedy(lm, tok.encode("hello").ids, max_new_tokens=5)
        assert len(new) == 5
        print("ok", "torch" in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "False"]


def test_bundle_runs_without_torch_or_transformers(tiny_exports, tmp_path, python_without):
    from moedge.graph_passes.bundle import split_bundle

    bundle = tmp_path / "bundle"
    split_bundle(tiny_exports("qwen2-moe"), bundle, progress=False)
    result = python_without(
        f"""
        from moedge.runtime import BundleRunner, greedy
        from moedge.tokenizer import load_tokenizer
        runner = BundleRunner({str(bundle)!r})
        tok = load_tokenizer({str(bundle / "tokenizer.json")!r})
        new = greedy(runner, tok.encode("hello").ids, max_new_tokens=5)
        assert len(new) == 5
        print("ok", "torch" in sys.modules, "onnx" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "False", "False"]
