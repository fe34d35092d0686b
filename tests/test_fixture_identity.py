"""Fixtures are the same bits on every machine, and their cache key names the weights they hold (quick tier: numpy
only, no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from quantize.fixtures import registry
from quantize.fixtures.exact_random import splitmix64, uniform, uniform_like
from quantize.fixtures.registry import FIXTURES

pytestmark = pytest.mark.quick


def test_splitmix64_is_the_published_generator():
    # splitmix64 seeded with 0 (Steele, Lea, Flood 2014; the reference C code's first outputs)
    assert [hex(int(x)) for x in splitmix64(0, 3)] == ["0xe220a8397b1dcdaf", "0x6e789e6aa1b965f4",
                                                       "0x6c45d188009454f"]


def test_uniform_values_are_fixed_bits():
    """Golden values: integer arithmetic and power-of-two scaling only, so these bits hold on any IEEE machine."""
    got = [float(x).hex() for x in uniform(21, "model.embed_tokens.weight", 3)]
    assert got == ["0x1.07fad98592832p-1", "0x1.4b8afdce46386p-1", "-0x1.3583be2ad69b2p-1"]


def test_uniform_like_has_the_asked_spread():
    values = uniform_like(7, "w", (512, 256), std=0.06, mean=1.0)
    assert values.dtype == np.float32 and values.shape == (512, 256)
    assert abs(values.std() - 0.06) < 1e-3 and abs(values.mean() - 1.0) < 1e-3
    assert np.array_equal(values, uniform_like(7, "w", (512, 256), std=0.06, mean=1.0))
    assert not np.array_equal(values, uniform_like(7, "v", (512, 256), std=0.06, mean=1.0))


def test_a_fixture_trained_differently_gets_another_cache_key(tmp_path, monkeypatch):
    spec = FIXTURES["behaving"]
    key = spec.digest()
    changed = tmp_path / "behaving.safetensors"
    data = bytearray(registry.trained_file("behaving").read_bytes())
    data[-1] ^= 1  # one bit of one weight
    changed.write_bytes(bytes(data))
    monkeypatch.setattr(registry, "trained_file", lambda name: changed)
    assert spec.digest() != key


def test_the_recorded_weights_are_part_of_the_cache_key(monkeypatch):
    spec = FIXTURES["qwen2-tied"]
    key = spec.digest()
    monkeypatch.setattr(registry, "expected_weights", lambda: {"qwen2-tied": "0" * 64})
    assert spec.digest() != key


def test_every_fixture_has_recorded_weights():
    recorded = registry.expected_weights()
    assert set(recorded) == set(FIXTURES)
    assert all(len(d) == 64 for d in recorded.values())
    for name, spec in FIXTURES.items():
        if spec.trained:
            assert registry.trained_file(name).stat().st_size < 5_000_000


def test_an_interrupted_build_leaves_its_staging_folder_to_the_next_build(tmp_path):
    """A build killed midway leaves ``.<name>-<digest>.building-<pid>``; the next build removes those of processes
    that are gone, and leaves those of builds still running."""
    import os
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    dead = tmp_path / f".behaving-0123456789ab.building-{dead_pid}"
    running = tmp_path / f".behaving-0123456789ab.building-{os.getppid()}"
    mine = tmp_path / f".qwen2-tied-0123456789ab.building-{os.getpid()}"
    for folder in (dead, running, mine):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "model.safetensors").write_bytes(b"x" * 100)
    keep = tmp_path / "behaving-0123456789ab"  # a finished fixture
    keep.mkdir()
    registry.remove_leftovers(tmp_path)
    assert not dead.exists() and running.exists() and mine.exists() and keep.exists()
def test_the_test_bed_recipe_and_its_base_are_part_of_the_cache_key(monkeypatch):
    from dataclasses import replace

    spec = FIXTURES["behaving-outliers"]
    key = spec.digest()
    recipe = registry.DERIVATIONS["outliers"]
    monkeypatch.setitem(registry.DERIVATIONS, "outliers", replace(recipe, massive_exp=recipe.massive_exp + 1))
    assert spec.digest() != key
    monkeypatch.setitem(registry.DERIVATIONS, "outliers", recipe)
    assert spec.digest() == key
    monkeypatch.setattr(registry, "trained_file", lambda name: registry.DATA_DIR / "behaving-think.safetensors")
    assert spec.digest() != key  # another base (its shipped weights) is another test bed


def test_test_bed_exponents_are_exact_and_heavy_tailed():
    from quantize.fixtures.outliers import exponents, massive_channels

    e = exponents(41, "model.layers.0.input_layernorm", 20000, (0.15, 0.05, 0.02))
    assert e.tolist() == exponents(41, "model.layers.0.input_layernorm", 20000, (0.15, 0.05, 0.02)).tolist()
    shares = [float(np.mean(np.abs(e) == k)) for k in (0, 1, 2, 3)]
    assert shares == pytest.approx([0.78, 0.15, 0.05, 0.02], abs=0.01)
    assert abs(float(np.mean(e > 0)) - float(np.mean(e < 0))) < 0.02  # both signs, equally often
    picked = massive_channels(41, "x", 256, 2)
    assert len(set(picked.tolist())) == 2 and picked.tolist() == massive_channels(41, "x", 256, 2).tolist()
