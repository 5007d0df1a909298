"""The Makefile's install recipes, run by the real `make` on a fake venv whose `bin/python` only logs its calls."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def fake_venv(tmp_path: Path, *stamps: str) -> Path:
    """A venv holding only the given stamps and a bin/python that appends its arguments to venv/calls."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> "{venv / "calls"}"\n')
    python.chmod(0o755)
    for name in stamps:
        (venv / name).touch()
    return venv


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def make(venv: Path, extra: str, *goals: str) -> subprocess.CompletedProcess:
    # Not the caller's make settings: `make test ARGS=...` passes its command line down through MAKEFLAGS.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    return subprocess.run(["make", "-C", str(ROOT), f"VENV={venv}", f"EXTRA={extra}", *goals],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("goal", ["setup", "run", "test"])
def test_installing_one_extra_over_the_other_is_refused_in_one_line(tmp_path, goal):
    """`make run EXTRA=gpu` over a CPU .venv would install tensorflow[and-cuda] beside tensorflow-cpu."""
    venv = fake_venv(tmp_path, ".installed-cpu", ".installed-cpu-backends")
    before = snapshot(venv)
    r = make(venv, "gpu", goal)
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr  # and no "make: *** [...] Error 1" after it
    assert f"{venv} was set up with EXTRA=cpu; run 'make clean VENV={venv}' first" in lines[0]
    assert f"VENV={venv}-gpu EXTRA=gpu" in lines[0]
    assert snapshot(venv) == before  # nothing ran: no pip, no stamp


def test_a_fresh_or_matching_venv_installs_as_before(tmp_path):
    # A fresh venv: the install recipe runs, with the extra asked for.
    venv = fake_venv(tmp_path)
    r = make(venv, "gpu", "setup")
    assert r.returncode == 0, r.stderr
    assert (venv / "calls").read_text().splitlines() == ["-m pip install --quiet --upgrade pip",
                                                         "-m pip install --quiet -e .[gpu,dev]"]
    assert (venv / ".installed-gpu").is_file()
    # Its stamp newer than pyproject.toml: nothing to do.
    stamp = venv / ".installed-gpu"
    newer = (ROOT / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (newer, newer))
    before = snapshot(venv)
    r = make(venv, "gpu", "setup")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert snapshot(venv) == before
