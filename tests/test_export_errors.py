"""Bad input gives a clear error naming the problem and leaves no partial output file."""

from __future__ import annotations

import json
import shutil

import pytest

import quantize.gguf_export as gguf_export
from quantize.cli import main as cli_main
from quantize.gguf_export import export_gguf
from rank1_local.core.errors import CorruptFileError, ModelNotFoundError, Rank1Error, UnsupportedModelError


@pytest.fixture
def model_copy(tmp_path, fixture_dir):
    """A private copy of the sharded fixture that a test may damage."""
    dst = tmp_path / "model"
    shutil.copytree(fixture_dir("qwen2-untied-sharded"), dst)
    return dst


def _leftovers(out_dir):
    return sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []


def test_missing_shard(model_copy, tmp_path):
    (model_copy / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="model-00002-of-00003.safetensors"):
        export_gguf(model_copy, tmp_path / "out", "F16", progress=False)
    assert _leftovers(tmp_path / "out") == []


def test_no_weights_at_all(model_copy, tmp_path):
    for f in model_copy.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(ModelNotFoundError, match="no \\*.safetensors"):
        export_gguf(model_copy, tmp_path / "out", "F16", progress=False)


def test_truncated_safetensors(model_copy, tmp_path):
    shard = model_copy / "model-00001-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated"):
        export_gguf(model_copy, tmp_path / "out", "Q8_0", progress=False)
    assert _leftovers(tmp_path / "out") == []


def test_garbage_safetensors_header(model_copy, tmp_path):
    (model_copy / "model-00003-of-00003.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CorruptFileError, match="model-00003-of-00003.safetensors"):
        export_gguf(model_copy, tmp_path / "out", "F16", progress=False)


def test_unsupported_architecture(model_copy, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        export_gguf(model_copy, tmp_path / "out", "F16", progress=False)


def test_config_shape_mismatch(model_copy, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    config["num_attention_heads"] = 4  # q_proj rows no longer match heads * head_dim
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="attn_k.weight|attn_q.weight"):
        export_gguf(model_copy, tmp_path / "out", "F16", progress=False)


def test_unknown_quant_type(fixture_dir, tmp_path):
    with pytest.raises(Rank1Error, match="Q5_K_X"):
        export_gguf(fixture_dir("qwen2-tied"), tmp_path / "out", "F16,Q5_K_X", progress=False)
    assert _leftovers(tmp_path / "out") == []


def test_type_needing_imatrix_is_refused(fixture_dir, tmp_path):
    with pytest.raises(Rank1Error, match="importance matrix"):
        export_gguf(fixture_dir("qwen2-tied"), tmp_path / "out", "IQ2_XS", progress=False)


def test_output_dir_not_writable(fixture_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(Rank1Error, match="not writable"):
        export_gguf(fixture_dir("qwen2-tied"), blocker / "out", "F16", progress=False)


def test_interrupted_export_leaves_no_partial_file(fixture_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = gguf_export.encode_tensor
    calls = {"n": 0}

    def interrupt_midway(job, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(job, qtype)

    monkeypatch.setattr(gguf_export, "encode_tensor", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(fixture_dir("qwen2-tied"), out, "F16,Q4_K_M", progress=False)
    assert _leftovers(out) == []


def test_interrupt_keeps_finished_files(fixture_dir, tmp_path, monkeypatch):
    """A finished earlier type stays; the interrupted one leaves nothing behind."""
    out = tmp_path / "out"
    real = gguf_export.write_gguf

    def fail_second(plan, out_type, path, **kw):
        if out_type == "Q8_0":
            path.write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(plan, out_type, path, **kw)

    monkeypatch.setattr(gguf_export, "write_gguf", fail_second)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(fixture_dir("qwen2-tied"), out, "F16,Q8_0", progress=False)
    assert _leftovers(out) == [f"{fixture_dir('qwen2-tied').name}-F16.gguf"]


def test_offline_hub_id_gives_plain_message(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    code = cli_main(["-q", "gguf", "jhu-clsp/rank1-0.5b", "--out", str(tmp_path / "out"), "--types", "F16"])
    err = capsys.readouterr().err
    assert code == 2
    assert "jhu-clsp/rank1-0.5b" in err and "local" in err
    assert "Traceback" not in err


def test_cli_reports_missing_folder(tmp_path, capsys):
    code = cli_main(["-q", "gguf", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "nope: no such checkpoint folder" in capsys.readouterr().err



def test_a_killed_export_leaves_nothing_after_the_next_run(fixture_dir, tmp_path):
    """SIGKILL in the middle of writing a GGUF leaves its temporary file (a killed process cleans nothing): the next
    export into the folder removes it, and a scratch folder, as left by a killed process; a running export's are
    kept."""
    import os
    import signal
    import subprocess
    import sys
    import time

    source = fixture_dir("behaving")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "quantize.cli", "-q", "gguf", str(source), "--out", str(out),
                             "--types", "F32"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob(".*.gguf.*.tmp")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = list(out.glob(".*.gguf.*.tmp")) + list(out.glob(".rank1-export-*"))
    assert left, "the export was not caught while writing"
    (out / f".rank1-export-{proc.pid}-x1y2").mkdir()  # a killed export's scratch folder
    running = out / f".other-Q8_0.gguf.{os.getpid()}.tmp"  # a running export's temporary file (this process)
    running.write_bytes(b"")
    export_gguf(fixture_dir("qwen2-tied"), out, "F16", progress=False)
    assert _leftovers(out) == sorted([f"{fixture_dir('qwen2-tied').name}-F16.gguf", running.name])
