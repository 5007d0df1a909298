"""tests/warmstart.py: a warm child is the process Python would start for the same command line, but for the
modules already imported. (That it trains to the bit as a new process does: tests/test_reproducible.py, a run
in a process Python starts and its rerun in a warm one.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import warmstart

SCRIPT = r"""
import atexit, os, signal, sys, threading, time
import emnist_cnn  # sets KERAS_BACKEND if unset, in the server as here
print("argv", sys.argv[1:], "name", __name__)
print("path0", sys.path[0] == os.path.dirname(os.path.abspath(__file__)), "cwd", os.getcwd())
print("env", os.environ.get("WARMSTART_CHECK"), "backend", os.environ.get("KERAS_BACKEND"))
print("stdin", os.path.samestat(os.fstat(0), os.stat(os.devnull)))
print("ctrl-c", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
sys.stdout.flush()
atexit.register(lambda: print("atexit ran", flush=True))
threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished", flush=True))).start()
what = sys.argv[1]
if what == "fail":
    raise ValueError("a bug")
if what == "wait":
    print("waiting", flush=True)
    time.sleep(60)
print("to stderr", file=sys.stderr)
sys.exit(3)
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "check.py"
    path.write_text(SCRIPT)
    return path


def both(argv, cwd, **env):
    """The same command line in a process Python starts and in a warm one."""
    full = dict(os.environ, WARMSTART_CHECK="yes", **env)
    real = subprocess.run(argv, capture_output=True, text=True, env=full, cwd=cwd, stdin=subprocess.DEVNULL,
                          timeout=120)
    warm = warmstart.run(argv, capture_output=True, text=True, env=full, cwd=cwd, timeout=120)
    return real, warm


def test_a_warm_child_runs_the_script_as_python_would(script, tmp_path):
    """Catches: the server's argv, path, folder, environment or Ctrl-C handling leaking into the child, an
    exit that skips atexit or the threads still running, a lost exit status. Seen failing with the child's
    atexit call removed, and with its Ctrl-C handler left as the server's (ignored)."""
    real, warm = both([sys.executable, str(script), "ok", "--flag"], cwd=tmp_path)
    assert real.returncode == warm.returncode == 3
    assert warm.stdout == real.stdout and warm.stderr == real.stderr == "to stderr\n"
    assert warm.stdout.splitlines() == [
        "argv ['ok', '--flag'] name __main__", f"path0 True cwd {tmp_path}", "env yes backend tensorflow",
        "stdin True", "ctrl-c True", "thread finished", "atexit ran"]


def test_a_failing_child_prints_its_traceback_and_exits_1(script, tmp_path):
    real, warm = both([sys.executable, str(script), "fail"], cwd=tmp_path)
    assert real.returncode == warm.returncode == 1
    assert warm.stderr.splitlines()[-1] == real.stderr.splitlines()[-1] == "ValueError: a bug"
    assert "Traceback (most recent call last):" in warm.stderr


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, -signal.SIGINT)])
def test_a_signal_reaches_the_child_and_its_status_comes_back(script, tmp_path, sig, code):
    """SIGKILL ends it at once; Ctrl-C raises KeyboardInterrupt, which, uncaught, ends it by SIGINT (Python's
    own exit status for it). Seen failing with an uncaught KeyboardInterrupt made exit status 1, and with the
    server's ignored SIGINT left to the child."""
    proc = warmstart.start([sys.executable, str(script), "wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, cwd=tmp_path)
    assert isinstance(proc, warmstart.Popen)
    deadline = time.monotonic() + 60
    line = ""
    while "waiting" not in line and time.monotonic() < deadline:
        line += os.read(proc.stdout.fileno(), 1000).decode()
    assert proc.poll() is None
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert ("KeyboardInterrupt" in err) is (sig == signal.SIGINT)


def test_a_start_up_setting_gets_a_server_started_with_it(script, tmp_path):
    """What TensorFlow or Python read at start-up comes from the server's own start. Seen failing with every
    environment given the one server (`start_up_key` returning ())."""
    argv = [sys.executable, str(script), "ok"]
    plain = warmstart.start(argv, stdout=subprocess.PIPE, text=True)
    other = warmstart.start(argv, stdout=subprocess.PIPE, text=True, env=dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0"))
    assert isinstance(plain, warmstart.Popen) and isinstance(other, warmstart.Popen)
    again = warmstart.start(argv, stdout=subprocess.DEVNULL)
    assert plain.server is not other.server and again.server is plain.server and again.wait(60) == 3
    assert ("TF_ENABLE_ONEDNN_OPTS", "0") in warmstart.start_up_key(dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0"))
    assert plain.communicate(timeout=60)[0] != "" and other.communicate(timeout=60)[0] != ""
    assert plain.returncode == other.returncode == 3
    # Any other command line gets a process Python starts: only `python -m emnist_cnn` and `python SCRIPT.py`
    # are served warm.
    assert isinstance(warmstart.start([sys.executable, "-c", "pass"]), subprocess.Popen)


def test_output_not_redirected_goes_where_this_process_writes(script, tmp_path, capfd):
    """stdout=None and stderr=None: the child writes to this process's own stdout and stderr, as subprocess
    leaves them. Seen failing when None gave the child /dev/null (a failing command's traceback was lost)."""
    proc = warmstart.start([sys.executable, str(script), "ok"], cwd=tmp_path)
    assert isinstance(proc, warmstart.Popen) and proc.wait(60) == 3
    out, err = capfd.readouterr()
    assert "ctrl-c True" in out and err == "to stderr\n"
