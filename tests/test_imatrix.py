"""Importance matrices: rank1 calibration, llama.cpp's file formats, and their effect on llama.cpp quantization."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from quantize.calibration import load_calibration, rank1_calibration, sample_calibration
from quantize.cli import main as quantize_cli
from quantize.gguf_export import ImatrixOptions, export_gguf
from quantize.imatrix import Imatrix, ImatrixEntry, read_imatrix, write_imatrix
from rank1_local.core.errors import CorruptFileError, Rank1Error

pytest.importorskip("transformers")
AUTO = ImatrixOptions("auto", size=2, max_think_tokens=4)


@pytest.fixture(scope="module")
def source(fixture_dir):
    return fixture_dir("qwen2-tied")


@pytest.fixture(scope="module")
def with_imatrix(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("imatrix")
    results = export_gguf(source, out, "Q4_K_M,IQ2_XS,IQ4_XS", imatrix=AUTO, progress=False, threads=1)
    return out, {r.type: r.path for r in results}


def test_calibration_is_deterministic(source):
    pairs = load_calibration()
    assert sample_calibration(pairs, 5, seed=1) == sample_calibration(pairs, 5, seed=1)
    assert sample_calibration(pairs, 5, seed=1) != sample_calibration(pairs, 5, seed=2)
    a = rank1_calibration(source, size=2, seed=3, max_think_tokens=4, progress=False)
    b = rank1_calibration(source, size=2, seed=3, max_think_tokens=4, progress=False)
    assert a == b and len(a.texts) == 2
    assert a.texts[0].startswith("Determine if the following passage is relevant") and "</think>" in a.texts[0]
    assert "2 pairs" in a.description and "seed 3" in a.description


def test_imatrix_file_is_llama_cpp_gguf_format(with_imatrix, source):
    out, _ = with_imatrix
    path = out / f"{source.name}.imatrix.gguf"
    reader = gguf.GGUFReader(str(path))  # llama.cpp's own Python reader
    assert reader.get_field("general.type").contents() == "imatrix"
    assert "rank1 calibration" in reader.get_field("imatrix.datasets").contents()[0]
    assert reader.get_field("imatrix.chunk_count").contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    q = tensors["blk.0.attn_q.weight.in_sum2"]
    assert q.tensor_type == gguf.GGMLQuantizationType.F32 and list(q.shape) == [256, 1]
    counts = tensors["blk.0.attn_q.weight.counts"]
    assert float(counts.data[0][0]) > 0
    assert "blk.1.ffn_down.weight.in_sum2" in tensors and not any(n.startswith("token_embd") for n in tensors)
    m = read_imatrix(path)
    entry = m.entries["blk.1.ffn_down.weight"]
    assert entry.sums.shape == (512,) and np.all(entry.mean() >= 0)


def test_imatrix_changes_quantized_bytes(with_imatrix, source, tmp_path):
    _, paths = with_imatrix
    reader = gguf.GGUFReader(paths["Q4_K_M"])  # recorded as llama-quantize records it
    assert reader.get_field("quantize.imatrix.file").contents() == f"{source.name}.imatrix.gguf"
    assert reader.get_field("quantize.imatrix.dataset").contents().startswith("rank1 calibration: 2 pairs")
    assert reader.get_field("quantize.imatrix.entries_count").contents() > 0
    assert reader.get_field("quantize.imatrix.chunks_count").contents() == 2
    (plain,) = export_gguf(source, tmp_path, "Q4_K_M", progress=False, threads=1)
    with_m = {t.name: t for t in reader.tensors}
    without = {t.name: t for t in gguf.GGUFReader(plain.path).tensors}
    assert {n: t.tensor_type for n, t in with_m.items()} == {n: t.tensor_type for n, t in without.items()}
    changed = [n for n, t in with_m.items() if t.data.tobytes() != without[n].data.tobytes()]
    assert "blk.0.ffn_down.weight" in changed and all(n.endswith(".weight") for n in changed)
    assert gguf.GGUFReader(plain.path).get_field("quantize.imatrix.file") is None


def test_iq2_needs_an_imatrix(with_imatrix, source, tmp_path, capsys):
    _, paths = with_imatrix
    assert paths["IQ2_XS"].stat().st_size > 0
    assert quantize_cli(["-q", "gguf", str(source), "--out", str(tmp_path), "--types", "IQ2_XS"]) == 2
    assert "IQ2_XS need(s) an importance matrix: add --imatrix auto" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_iq4_xs_is_made_with_an_imatrix_and_refused_without(with_imatrix, source, tmp_path, capsys):
    _, paths = with_imatrix
    types = {t.tensor_type for t in gguf.GGUFReader(paths["IQ4_XS"]).tensors if len(t.shape) == 2}
    assert gguf.GGMLQuantizationType.IQ4_XS in types
    assert quantize_cli(["-q", "gguf", str(source), "--out", str(tmp_path), "--types", "Q8_0,IQ4_XS"]) == 2
    assert "IQ4_XS: i-quants are made for an importance matrix" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything was written, Q8_0 included
    assert quantize_cli(["-q", "gguf", str(source), "--out", str(tmp_path), "--types", "IQ4_XS",
                         "--allow-no-imatrix"]) == 0
    assert (tmp_path / f"{source.name}-IQ4_XS.gguf").stat().st_size > 0


def test_existing_imatrix_file_is_used(with_imatrix, source, tmp_path):
    out, paths = with_imatrix
    results = export_gguf(source, tmp_path, "Q4_K_M", progress=False, threads=1,
                          imatrix=ImatrixOptions(out / f"{source.name}.imatrix.gguf"))
    assert results[0].path.read_bytes() == paths["Q4_K_M"].read_bytes()


def test_legacy_dat_format_is_read(tmp_path):
    values = np.arange(4, dtype="<f4") * 3.0  # mean * ncall with ncall 3
    name = b"blk.0.ffn_up.weight"
    raw = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 3, 4) + values.tobytes()
    raw += struct.pack("<i", 7) + struct.pack("<i", 8) + b"data.txt"
    path = tmp_path / "old.dat"
    path.write_bytes(raw)
    m = read_imatrix(path)
    assert m.chunk_count == 7 and m.datasets == ["data.txt"]
    assert np.allclose(m.entries["blk.0.ffn_up.weight"].mean(), [0, 1, 2, 3])


def test_imatrix_errors(source, tmp_path, capsys):
    with pytest.raises(Rank1Error, match="no such imatrix file"):
        read_imatrix(tmp_path / "none.gguf")
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\xff\xff\xff\xff garbage")
    with pytest.raises(CorruptFileError, match="not a llama.cpp imatrix file"):
        read_imatrix(junk)
    other = tmp_path / "other.imatrix.gguf"
    write_imatrix(other, Imatrix({"blk.0.some_other.weight": ImatrixEntry(np.ones(8, np.float32),
                                                                          np.ones(1, np.float32))}, ["x"], 1, 1))
    out = tmp_path / "out"
    assert quantize_cli(["-q", "gguf", str(source), "--out", str(out), "--types", "Q4_K_M", "--imatrix",
                         str(other)]) == 2
    assert "has no entries for this model's tensors" in capsys.readouterr().err
    assert quantize_cli(["-q", "gguf", str(source), "--out", str(out), "--types", "Q4_K_M", "--imatrix", "auto",
                         "--calibration", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such calibration file" in capsys.readouterr().err
    assert not out.exists() or not any(p.suffix == ".gguf" for p in out.rglob("*"))


def test_calibration_with_rank1_think_tokens(fixture_dir):
    """Calibration texts of a model with rank1's tokenizer hold <think> and </think> as their special tokens."""
    import transformers

    think = fixture_dir("behaving-think")
    calibration = rank1_calibration(think, size=2, seed=0, max_think_tokens=64, progress=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(think)
    for text in calibration.texts:
        ids = tokenizer.encode(text)
        assert 151665 in ids and ids.count(151666) == 1 and ids[-1] in (830, 895)
