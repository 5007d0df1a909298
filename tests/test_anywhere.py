"""The suite passes the same anywhere: where a GPU is seen, CPU facts skip with their reason; without an optional
extra, its tests skip with the reason (and fail under EMNIST_CNN_REQUIRE_DEPS=1, as in CI)."""

import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_pytest_in_child(tmp_path: Path, plugin: str, *args: str, **env) -> subprocess.CompletedProcess:
    """pytest ARGS in a child process, one worker, with `plugin` (Python source) loaded as a plugin first."""
    (tmp_path / "child_plugin.py").write_text(plugin)
    full = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "child_plugin", "-p", "no:cacheprovider",
                           "-p", "no:xdist", "-rs", "--rootdir", str(TESTS.parent), *args],
                          capture_output=True, text=True, timeout=600, cwd=TESTS.parent, env=full)


FAKE_GPU = """
import emnist_cnn.core.model as model
model.accelerator_available = lambda: True
"""


def test_cpu_facts_skip_with_their_reason_where_a_gpu_is_seen(tmp_path):
    """Catches: cpu_facts never skipped where a GPU is seen (seen failing)."""
    r = run_pytest_in_child(tmp_path, FAKE_GPU, "tests/test_device.py", "tests/test_recipes.py",
                        "-k", "runtime_on_this_cpu or fused_equals_one_at_a_time or step_table")
    out = r.stdout
    assert r.returncode == 0, out[-3000:]
    # The two CPU facts skip, saying why; the step table (arithmetic, the same on any device) still runs.
    assert re.search(r"\b[1-9]\d* passed, 2 skipped", out) and "failed" not in out, out[-3000:]
    assert out.count("the Keras backend sees a GPU here") == 2, out[-3000:]


NO_MLFLOW = """
import sys
sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, as where the extra is not installed
"""


def test_a_missing_extra_skips_its_tests_with_the_reason_and_fails_them_in_ci(tmp_path):
    """Catches: a missing extra that errors instead of skipping, or skips silently in CI."""
    args = ("tests/test_tracking.py", "-k", "kills_and_a_server_outage")
    r = run_pytest_in_child(tmp_path, NO_MLFLOW, *args, EMNIST_CNN_REQUIRE_DEPS="0")
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout[-3000:]
    assert "mlflow is not installed (the tracking tests start a real MLflow server" in r.stdout
    r = run_pytest_in_child(tmp_path, NO_MLFLOW, *args, EMNIST_CNN_REQUIRE_DEPS="1")
    assert r.returncode == 1 and "1 error" in r.stdout, r.stdout[-3000:]
    assert "in CI a missing test dependency fails" in r.stdout
