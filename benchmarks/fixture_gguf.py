"""The fixture GGUFs the benchmarks run on (built offline once, kept in the fixture cache)."""

from __future__ import annotations

from pathlib import Path


def fixture_gguf(name: str = "behaving", gguf_type: str = "Q8_0") -> Path:
    """The GGUF export of fixture ``name`` (``behaving``: a small trained rank1-format reranker that closes its
    reasoning; ``rank1-0.5b-shape``: random weights in rank1-0.5b's exact shape)."""
    from quantize.fixtures import build_fixture, fixture_cache_dir
    from quantize.gguf_export import export_gguf

    src = build_fixture(name)
    target = fixture_cache_dir() / "gguf" / f"{src.name}-{gguf_type}.gguf"
    if not target.exists():
        export_gguf(src, target.parent, gguf_type, progress=False, allow_no_imatrix=True)
    return target


def llama_cpp_converted_gguf(name: str, outtype: str = "f32") -> Path:
    """Fixture ``name`` converted by llama.cpp's own converter (``convert_hf_to_gguf.py`` from the llama-cpp-python
    sdist; it needs torch, transformers and sentencepiece), kept in the fixture cache."""
    from quantize.fixtures import build_fixture, fixture_cache_dir
    from quantize.fixtures.llama_cpp_sdist import convert_with_llama_cpp

    src = build_fixture(name)
    target = fixture_cache_dir() / "gguf" / f"{src.name}-llama-cpp-{outtype}.gguf"
    if not target.exists():
        partial = target.with_name(target.name + ".partial")
        convert_with_llama_cpp(src, partial, outtype, cache_dir=fixture_cache_dir())
        partial.replace(target)  # a converter stopped halfway leaves no file under the final name
    return target
