"""The GPU check's dry run: benchmarks/gpu_check.sh with DEVICE=cpu and small sizes, so the script a GPU
machine runs cannot rot unseen (what it finds on a GPU is in README.md, "GPU check")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trains

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
PHASES = ["fused", "unfused", "fixed", "bf16", "resume", "steps1"]


@pytest.mark.timeout(600)
def test_the_gpu_check_runs_every_phase_on_the_cpu_and_reports_each(tmp_path):
    """Each phase reports what the issue asks for. Catches: a phase that fails or is skipped; a resume that
    trains again from scratch (its process trains epoch 2 only, and ends with the uninterrupted run's very
    weights on a CPU); recalibration by prefix passes or validation one member at a time (calls per
    member-epoch: one recalibration each, one validation call shared by the 2 members); a report that
    misses a figure; the checking process importing the backend (it would hold the GPU)."""
    out = tmp_path / "out"
    # TensorFlow here (the suite's backend, and the fastest to start); the GPU machine's JAX device-fed path
    # has tests of its own in tests/test_backends.py.
    env = dict(os.environ, DEVICE="cpu", OUT=str(out), KERAS_BACKEND="tensorflow", PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT), "--work", str(tmp_path / "work")], env=env, capture_output=True,
                          text=True, timeout=580)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    phases = results["phases"]
    assert list(phases) == PHASES
    fused, unfused, fixed, bf16, resume, steps1 = (phases[p] for p in PHASES)
    for figures in (fused, unfused, bf16, steps1):
        assert figures["rc"] == 0 and figures["epochs_trained"] == [1, 2]
        assert figures["start_up_line"].startswith("training on CPU (no GPU is used)")
        assert len(figures["compile_s"]) >= 1 and figures["img_s_steady"] > figures["img_s_first_epoch"] > 0
        assert all(0 <= e < 20 for e in figures["val_error_pct_last"])  # learnable digits, 2 epochs
    assert "; fused;" in fused["start_up_line"] and "one member at a time" in unfused["start_up_line"]
    assert "mixed_bfloat16" in bf16["start_up_line"] and "float32" in fused["start_up_line"]
    assert resume["epochs_trained_after_resume"] == [2]
    assert resume["weights_identical"] is True and resume["weights_max_abs_diff"] == 0
    assert resume["val_error_pct_resumed"] == resume["val_error_pct_uninterrupted"]
    assert fixed["calls_per_member_epoch"] == 1 + 1 / 2
    assert fixed["total_ms_per_member"] > 0 and fixed["runtime"]["device"] == "CPU"
    # Each part as training does it, and validation with the state's write overlapped, as training runs them.
    assert all(fixed[f"{part}_ms_per_member"] > 0 for part in ("recalibrate", "validate", "snapshot", "write",
                                                               "validate_while_writing"))
    assert results["backend_imported_here"] is False
    text = (out / "gpu_check.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in text[1:]] == PHASES
    assert {p.name for p in out.iterdir()} >= {"machine.txt", "fused.log", "resume-killed.log", "resume.log"}
