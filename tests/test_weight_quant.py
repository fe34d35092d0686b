"""GPTQ and AWQ exports (`rank1-quantize gptq|awq`) of the behaving fixture: real GPTQModel runs on the CPU, the
checkpoint layout vLLM and transformers read, rank1 scoring with `--backend transformers` against the fp32
reference, and the errors that must come before any work (and never leave a partial folder)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import WEIGHT_QUANT_CALIBRATION, WEIGHT_QUANT_EXPORTS, weight_quant_cache

from quantize.cli import main as quantize
from quantize.fixtures.synthetic_task import eval_pairs
from rank1_local.cli.main import main as rerank

pytest.importorskip("transformers")

PAIRS = list({(p.query_word, p.passage_word): p for p in eval_pairs()[::4] + eval_pairs()[1::9]}.values())
CALIBRATION = list(WEIGHT_QUANT_CALIBRATION)
SETTINGS = {"max_think_tokens": 64, "n_ctx": 512}


def _export(fixture_dir, out, method: str, *extra: str):
    assert quantize(["-q", method, str(fixture_dir("behaving")), "--out", str(out), *CALIBRATION, *extra]) == 0
    return out


def _scores(model_dir) -> tuple[list, str]:
    from rank1_local.backends.hf import TransformersRank1

    with TransformersRank1(model_dir, device="cpu", **SETTINGS) as model:
        return model.score_pairs([(p.query, p.passage) for p in PAIRS]), model.device


@pytest.fixture(scope="module")
def reference(fixture_dir):
    return _scores(fixture_dir("behaving"))[0]


@pytest.fixture(scope="module")
def exports(fixture_dir, tmp_path_factory):
    pytest.importorskip("gptqmodel")
    root = tmp_path_factory.mktemp("weight-quant")
    made = {method: _export(fixture_dir, root / f"{method}-4bit", method, *args)
            for method, args in WEIGHT_QUANT_EXPORTS.items()}
    keep = weight_quant_cache(fixture_dir("behaving"))  # for the vLLM tests, whose virtualenv has no GPTQModel
    for method, folder in made.items():
        if not (keep / method / "config.json").is_file():
            staging = keep / f"{method}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(folder, staging)
            shutil.rmtree(keep / method, ignore_errors=True)
            staging.rename(keep / method)
    for stale in keep.parent.glob(f"{fixture_dir('behaving').name}-exporter-*"):
        if stale != keep:  # an older exporter's
            shutil.rmtree(stale, ignore_errors=True)
    return made


def _tensor_layout(folder) -> dict[str, tuple[list[int], str]]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "np") as f:
        return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()
                if k.startswith("model.layers.0.mlp.down_proj.")}


def test_gptq_export_is_a_gptq_checkpoint(exports):
    folder = exports["gptq"]
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["bits"], quant["group_size"]) == ("gptq", 4, 128)
    assert quant["desc_act"] is False and quant["sym"] is True
    assert json.loads((folder / "quantize_config.json").read_text())["bits"] == 4  # auto-gptq's file
    # the shapes vLLM's GPTQ/GPTQ-Marlin loaders allocate; down_proj: in 512, out 256, 8 four-bit values per int32
    layout = _tensor_layout(folder)
    assert layout["model.layers.0.mlp.down_proj.qweight"] == ([512 // 8, 256], "I32")
    assert layout["model.layers.0.mlp.down_proj.qzeros"] == ([512 // 128, 256 // 8], "I32")
    assert layout["model.layers.0.mlp.down_proj.scales"] == ([512 // 128, 256], "F16")
    assert layout["model.layers.0.mlp.down_proj.g_idx"] == ([512], "I32")
    assert "model.layers.0.mlp.down_proj.weight" not in layout
    card = (folder / "README.md").read_text()
    record = json.loads((folder / "rank1_export.json").read_text())
    assert record["calibration"].startswith("rank1 calibration: 8 pairs") and record["calibration"] in card
    assert "budget 64" in record["calibration"] and "GPTQ 4-bit" in card
    assert not list(folder.parent.glob(".*partial*"))


def test_awq_export_is_an_autoawq_gemm_checkpoint(exports):
    folder = exports["awq"]
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["bits"], quant["group_size"]) == ("awq", 4, 128)
    assert quant["version"] == "gemm" and quant["zero_point"] is True
    layout = _tensor_layout(folder)  # AutoAWQ's GEMM layout, packed along the output dimension, as vLLM reads it
    assert layout["model.layers.0.mlp.down_proj.qweight"] == ([512, 256 // 8], "I32")
    assert layout["model.layers.0.mlp.down_proj.qzeros"] == ([512 // 128, 256 // 8], "I32")
    assert layout["model.layers.0.mlp.down_proj.scales"] == ([512 // 128, 256], "F16")
    assert "AWQ 4-bit" in (folder / "README.md").read_text()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_exports_score_like_the_fp32_reference(exports, reference, method):
    results, backend = _scores(exports[method])
    assert backend == "transformers cpu float16"
    agree = sum((r.score > 0.5) == (x.score > 0.5) for r, x in zip(results, reference, strict=True)) / len(PAIRS)
    mean_diff = sum(abs(r.score - x.score) for r, x in zip(results, reference, strict=True)) / len(PAIRS)
    assert agree >= 0.95, f"{method}: decision agreement {agree:.2%}"
    assert mean_diff < 0.1, f"{method}: mean |Δscore| {mean_diff:.3f}"
    assert all(0.0 <= r.score <= 1.0 and r.reasoning for r in results)


def test_rerank_cli_runs_a_gptq_export(exports, tmp_path, capsys):
    docs = tmp_path / "docs.txt"
    pair = PAIRS[0]
    docs.write_text(f"{pair.passage}\n{PAIRS[3].passage}\n")
    assert rerank(["-q", "rerank", "--backend", "transformers", "--model", str(exports["gptq"]), "--query",
                   pair.query, "--docs", str(docs), "--format", "json", "--max-think-tokens", "64"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and all(0.0 <= r["score"] <= 1.0 for r in rows)


def test_quantized_checkpoints_refuse_float32(exports):
    from rank1_local.backends.hf import TransformersRank1
    from rank1_local.core.errors import Rank1Error

    with pytest.raises(Rank1Error, match="float16 or bfloat16"):
        TransformersRank1(exports["awq"], device="cpu", dtype="float32")


def test_gptq_8bit_export(fixture_dir, tmp_path, reference):
    pytest.importorskip("gptqmodel")
    from rank1_local.backends.hf import TransformersRank1

    folder = _export(fixture_dir, tmp_path / "gptq-8bit", "gptq", "--bits", "8", "--group-size", "64")
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (quant["bits"], quant["group_size"]) == (8, 64)
    assert _tensor_layout(folder)["model.layers.0.mlp.down_proj.qweight"] == ([512 // 4, 256], "I32")
    with TransformersRank1(folder, device="cpu", **SETTINGS) as model:
        results = model.score_pairs([(p.query, p.passage) for p in PAIRS[:4]])
    assert [r.score > 0.5 for r in results] == [x.score > 0.5 for x in reference[:4]]
    assert max(abs(r.score - x.score) for r, x in zip(results, reference[:4], strict=True)) < 0.05


@pytest.mark.parametrize("args, message", [
    (["awq", "--bits", "8"], "AWQ supports --bits 4, not 8"),
    (["gptq", "--bits", "3"], "GPTQ supports --bits 4 or 8, not 3"),
    (["gptq", "--group-size", "96"], "power of two"),
    (["gptq", "--group-size", "512"], "does not divide this model's hidden_size"),
    (["awq", "--group-size", "-1"], "AWQ needs a group size"),
    (["gptq", "--calibration", "missing.jsonl"], "missing.jsonl: no such calibration file"),
    (["gptq", "--calibration-size", "0"], "--calibration-size must be at least 1"),
])
def test_bad_settings_are_refused_before_any_work(fixture_dir, tmp_path, capsys, args, message):
    method, *rest = args
    out = tmp_path / "out"
    assert quantize(["-q", method, str(fixture_dir("behaving")), "--out", str(out), *rest]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_existing_output_folder_is_left_alone(fixture_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert quantize(["-q", "gptq", str(fixture_dir("behaving")), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unsupported_architecture_is_refused(tmp_path, capsys):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(model / "model.safetensors"))
    assert quantize(["-q", "awq", str(model), "--out", str(tmp_path / "out")]) == 2
    assert "unsupported architecture (GPT2LMHeadModel)" in capsys.readouterr().err


def test_failure_during_export_leaves_no_output(fixture_dir, tmp_path, monkeypatch, capsys):
    """An error after GPTQModel saved the quantized model (here: writing the model card) leaves neither the
    output folder nor the staging folder behind."""
    pytest.importorskip("gptqmodel")
    import quantize.weight_quant as wq
    from rank1_local.core.errors import Rank1Error

    def fail(target, _text):
        assert target.parent.is_dir() and any(target.parent.glob("*.safetensors"))  # GPTQModel has saved
        raise Rank1Error("disk full")

    monkeypatch.setattr(wq, "write_text_atomic", fail)
    out = tmp_path / "out"
    assert quantize(["-q", "gptq", str(fixture_dir("behaving")), "--out", str(out), *CALIBRATION]) == 2
    assert "disk full" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_gptqmodel_log_folder_is_put_back(tmp_path):
    pytest.importorskip("gptqmodel")
    from gptqmodel.looper import loop_processor

    from quantize.weight_quant import logs_redirected

    before = loop_processor._PROJECT_LOG_DIR
    with logs_redirected(tmp_path / "logs"):
        assert loop_processor._PROJECT_LOG_DIR == tmp_path / "logs"
    assert loop_processor._PROJECT_LOG_DIR == before


def test_gptq_export_with_rank1_think_tokens(fixture_dir, tmp_path):
    """rank1's tokenizer (<think>, </think> as special tokens): the GPTQ export keeps them and scores like the
    source."""
    pytest.importorskip("gptqmodel")
    from rank1_local.backends.hf import TransformersRank1

    source = fixture_dir("behaving-think")
    out = tmp_path / "think-gptq"
    assert quantize(["-q", "gptq", str(source), "--out", str(out), *CALIBRATION]) == 0
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tokenizer["added_tokens"] if t["special"]}
    assert specials["<think>"] == 151665 and specials["</think>"] == 151666
    pairs = [(p.query, p.passage) for p in PAIRS[:6]]
    with TransformersRank1(source, device="cpu", **SETTINGS) as model:
        want = model.score_pairs(pairs)
    with TransformersRank1(out, device="cpu", **SETTINGS) as model:
        got = model.score_pairs(pairs)
    assert sum((g.score > 0.5) == (w.score > 0.5) for g, w in zip(got, want, strict=True)) >= 5
    assert sum(g.reasoning == w.reasoning for g, w in zip(got, want, strict=True)) >= 5
