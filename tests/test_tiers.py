"""The vLLM and Ray tiers cannot go green by skipping where they must run (CI, or ``--require``): each tier is run
with its engine's import broken on purpose, and stops at once (full tier: a few pytest runs). The GPTQ/AWQ exports
kept for the vLLM tier are an exporter's own (quick tier)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXPORTER_SOURCES, exporter_digest, weight_quant_cache

ROOT = Path(__file__).resolve().parents[1]
TIER_FILES = {"vllm": ["tests/test_vllm_judge.py"],
              "ray": ["tests/test_ray_batch.py", "tests/test_ray_serve.py", "tests/test_study.py"]}


def run_tier(tmp_path: Path, tier: str, *flags: str, ci: bool = False) -> subprocess.CompletedProcess:
    """The tier's tests with its engine shadowed by a package whose import fails."""
    shadow = tmp_path / "shadow" / tier
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(f"raise ModuleNotFoundError('simulated: this {tier} is broken')\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(shadow.parent), str(ROOT)])
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", tier, *flags,
                           *TIER_FILES[tier]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("tier, ci", [("vllm", False), ("ray", True)])
def test_a_tier_whose_engine_does_not_import_fails_where_it_must_run(tier, ci, tmp_path):
    """``--require TIER`` (as .ci/run runs the tiers) or ``CI=true``: every test of the tier fails, naming the import
    error."""
    out = run_tier(tmp_path, tier, ci=ci) if ci else run_tier(tmp_path, tier, "--require", tier)
    assert out.returncode == 1, out.stdout[-2000:]
    assert f"the {tier} tier must run here" in out.stdout and f"simulated: this {tier} is broken" in out.stdout
    assert " passed" not in out.stdout and " skipped" not in out.stdout, out.stdout[-2000:]


@pytest.mark.parametrize("tier", list(TIER_FILES))
def test_elsewhere_a_tier_whose_engine_does_not_import_skips_and_says_why(tier, tmp_path):
    out = run_tier(tmp_path, tier, "-rs")
    assert out.returncode == 0 and " skipped" in out.stdout and " passed" not in out.stdout, out.stdout[-2000:]
    assert f"`import {tier}` fails: simulated: this {tier} is broken" in out.stdout


@pytest.mark.quick
def test_the_kept_gptq_and_awq_exports_are_named_by_the_exporter_that_made_them(tmp_path):
    """A changed exporter (source, calibration data) gets a folder of its own: the vLLM tier never judges an export
    an older exporter made. The name depends on the files' contents, not on where the tree is."""
    for rel in EXPORTER_SOURCES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (ROOT / rel).is_dir() else shutil.copy)(ROOT / rel, tmp_path / rel)
    source = Path("behaving-0123")
    assert exporter_digest(tmp_path) == exporter_digest(ROOT)
    assert weight_quant_cache(source, tmp_path) == weight_quant_cache(source, ROOT)
    for rel in ("quantize/weight_quant.py", "quantize/data/calibration_trec_rag24.jsonl"):
        before = weight_quant_cache(source, tmp_path)
        with open(tmp_path / rel, "a") as f:
            f.write("\n")
        assert weight_quant_cache(source, tmp_path) != before, rel


def test_require_names_a_known_tier():
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co", "--require", "vlm",
                          "tests/test_tiers.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 4 and "--require: no tier vlm (tiers: vllm, ray)" in out.stderr, out.stderr
