"""`rank1-quantize verify`: reports beside the file, numbers that separate good and bad exports."""

from __future__ import annotations

import json

import pytest

from quantize.cli import main as cli_main
from quantize.verify import kl_divergence, report_paths, verify_gguf, write_report
from rank1_local.core.errors import CorruptFileError

pytest.importorskip("transformers")


def test_kl_divergence_basics():
    import numpy as np

    a = np.array([[1.0, 2.0, 3.0]])
    assert kl_divergence(a, a)[0] == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(a, a + 5.0)[0] == pytest.approx(0.0, abs=1e-12)  # shift invariant
    assert kl_divergence(a, a[:, ::-1])[0] > 0.1


@pytest.mark.parametrize("name", ["behaving", "behaving-think"])
def test_f16_verifies_close_to_source(name, fixture_dir, exported):
    report = verify_gguf(exported(name, "F16"), fixture_dir(name), n_prompts=3, threads=2, progress=False)
    assert report.source_engine == "transformers-fp32"
    assert report.n_prompts == 3 and report.tokenizer_agreement == 1.0
    assert report.kl_mean < 1e-4
    assert report.top1_agreement > 0.98
    assert report.score_abs_diff_max < 0.01


def test_q2_k_is_measurably_worse_than_q8_0_against_a_gguf_source(exported):
    """Torch-free route: the reference is the F32 GGUF."""
    ref = exported("qwen2-tied", "F32")
    good = verify_gguf(exported("qwen2-tied", "Q8_0"), ref, n_prompts=2, threads=2, progress=False)
    bad = verify_gguf(exported("qwen2-tied", "Q2_K"), ref, n_prompts=2, threads=2, progress=False)
    assert good.source_engine == "llama.cpp"
    assert bad.kl_mean > 10 * good.kl_mean
    assert good.top1_agreement > bad.top1_agreement


def test_cli_writes_json_and_markdown(fixture_dir, exported, tmp_path, capsys):
    gguf = tmp_path / "model-Q8_0.gguf"
    gguf.write_bytes(exported("behaving", "Q8_0").read_bytes())
    code = cli_main(["-q", "verify", str(gguf), "--source", str(fixture_dir("behaving")), "--prompts", "2",
                     "--threads", "2"])
    assert code == 0
    json_path, md_path = report_paths(gguf)
    data = json.loads(json_path.read_text())
    assert data["n_prompts"] == 2 and len(data["prompts"]) == 2
    assert {"kl_mean", "kl_max", "top1_agreement", "score_abs_diff_max"} <= set(data)
    assert "top-1 next-token agreement" in md_path.read_text()
    assert "top-1" in capsys.readouterr().out


def test_verify_rejects_non_gguf(tmp_path, fixture_dir):
    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CorruptFileError, match="not a GGUF"):
        verify_gguf(bogus, fixture_dir("qwen2-tied"), n_prompts=1, progress=False)


def test_report_rewrite_is_atomic(exported, fixture_dir):
    report = verify_gguf(exported("qwen2-tied", "Q8_0"), exported("qwen2-tied", "F32"), n_prompts=1,
                         threads=2, progress=False)
    json_path, _ = write_report(report)
    write_report(report)
    assert json.loads(json_path.read_text())["n_prompts"] == 1
    assert not list(json_path.parent.glob(".*.tmp"))
