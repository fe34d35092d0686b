"""`rank1-local demo`: the behaving fixture rebuilt without torch is the torch build, bit for bit (weights, config,
tokenizer, and so the GGUF), and the demo runs end to end in a Python where torch, transformers and tokenizers cannot
be imported, then reuses what it built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# a Python in which the reference extra is missing, as in the default install
NO_TORCH = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers", "tokenizers", "safetensors"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, Missing())
"""


def test_the_numpy_build_is_the_torch_build(fixture_dir, tmp_path):
    from quantize.fixtures import fixture_cache_dir
    from quantize.fixtures.numpy_build import build_checkpoint
    from quantize.gguf_export import export_gguf

    torch_built = fixture_dir("behaving")
    built = tmp_path / "numpy" / "fixture-behaving"
    build_checkpoint("behaving", built, fixture_cache_dir())  # raises unless the weights digest is the recorded one
    config = json.loads((torch_built / "config.json").read_text())
    config.pop("transformers_version")
    assert json.loads((built / "config.json").read_text()) == config
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((built / name).read_text()) == json.loads((torch_built / name).read_text()), name
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "fixture-behaving").symlink_to(torch_built, target_is_directory=True)
    exports = [export_gguf(folder, tmp_path / f"out-{i}", "Q8_0", progress=False)[0].path
               for i, folder in enumerate((built, tmp_path / "torch" / "fixture-behaving"))]
    assert exports[0].read_bytes() == exports[1].read_bytes()


def test_the_json_tokenizer_is_the_tokenizers_librarys(tmp_path, vocab_test_file):
    """For rank1's tokenizer too (<think> and </think> added): the JSON written by hand is the JSON the tokenizers
    library writes from the same facts."""
    pytest.importorskip("tokenizers")
    from quantize.fixtures.hf_tokenizer import QWEN2, QWEN2_RANK1, write_hf_tokenizer, write_qwen2_tokenizer_json

    vocab = vocab_test_file("qwen2", "")
    for flavor in (QWEN2, QWEN2_RANK1):
        write_hf_tokenizer(flavor, vocab, tmp_path / "library")
        write_qwen2_tokenizer_json(flavor, vocab, tmp_path / "json")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert json.loads((tmp_path / "json" / name).read_text()) == \
                json.loads((tmp_path / "library" / name).read_text()), (flavor, name)


def test_the_demo_runs_without_torch_and_then_reuses_what_it_built(tmp_path, vocab_test_file):
    vocab = vocab_test_file("qwen2", "").parent  # the vocabulary files already here: no package index needed
    env = {**os.environ, "RANK1_FIXTURES_DIR": str(tmp_path / "fixtures"), "RANK1_VOCAB_DIR": str(vocab),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    code = NO_TORCH + "from quantize.cli import main; sys.exit(main(['demo']))"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    out = first.stdout
    for step in ("1. fixture rebuilt the behaving fixture", "2. export  exported it to GGUF Q8_0",
                 "3. check   scored its 56 evaluation pairs on llama.cpp", "4. rerank"):
        assert step in out, out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit() and "This passage" in line]
    assert [r.split()[2] for r in rows] == ["0", "2", "1"]  # apple, then cherry (unsure), then tiger
    assert rows[0].split()[1] == "1.0000" and 0.3 < float(rows[1].split()[1]) < 0.7
    assert "not a rank1 model" in out
    again = subprocess.run([sys.executable, "-m", "rank1_local.cli.main", "demo"], env=env, capture_output=True,
                           text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1. fixture reused" in again.stdout and "2. export  reused" in again.stdout
    assert again.stdout.count("This passage describes the") == 3
