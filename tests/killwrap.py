"""`emnist-cnn ARGS` with functions patched to count their calls and, optionally, to kill this process at the
Nth call of one of them (used by tests/test_killpoints.py and tests/test_cli.py).

EMNIST_CNN_KILL_SPEC is a JSON object:

- "targets": dotted names of the functions to patch (each call is counted, with the file names among its
  first two arguments);
- "target", "n", "when" ("before" or "after" the real call), "how" ("SIGKILL", "SIGINT" or "raise"): the
  kill point, if any. SIGKILL: nothing runs afterwards. SIGINT (Ctrl-C): Python raises KeyboardInterrupt where
  the signal lands, and every `finally` and `except BaseException` on the way up runs. "raise": a RuntimeError
  there, as a bug would (the process fails instead of being stopped);
- "fired_file": where the kill point writes what it hit, with the call counts so far, just before the kill;
- "count_file" (optional): where the call counts and file names are written when the process exits normally.
"""

import atexit
import json
import os
import signal
import sys
import threading
import time

import emnist_cnn  # noqa: F401  (selects the backend)
import emnist_cnn.training.train  # noqa: F401
import keras  # noqa: F401
from killtargets import resolve

spec = json.loads(os.environ["EMNIST_CNN_KILL_SPEC"])
counts = {}
calls = {}  # target -> per call, the file names among its first two arguments
counting = threading.Lock()


def names(args):
    return [os.path.basename(os.fspath(a)) for a in args[:2] if isinstance(a, (str, os.PathLike))]


def fire(target, n, when, args):
    with open(spec["fired_file"], "w") as f:
        json.dump({"target": target, "n": n, "when": when, "args": [str(a) for a in args[:2]],
                   "counts": counts}, f)
    if spec["how"] == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
    if spec["how"] == "raise":
        raise RuntimeError(f"injected failure at call {n} of {target}")
    os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt at its next check, i.e. here
    for _ in range(500):
        time.sleep(0.01)
    raise RuntimeError("SIGINT was not delivered")


def patch(target):
    owner, attr = resolve(target)
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        with counting:  # state files are written from several threads
            counts[target] = n = counts.get(target, 0) + 1
            calls.setdefault(target, []).append(names(args))
        hit = target == spec.get("target") and n == spec.get("n")
        if hit and spec["when"] == "before":
            fire(target, n, "before", args)
        result = original(*args, **kwargs)
        if hit and spec["when"] == "after":
            fire(target, n, "after", args)
        return result

    setattr(owner, attr, wrapper)


def write_counts():
    with open(spec["count_file"], "w") as f:
        json.dump({"counts": counts, "calls": calls}, f)


for target in spec["targets"]:
    patch(target)
if spec.get("count_file"):
    atexit.register(write_counts)


def run_cli():
    from emnist_cnn.cli import main  # after patching, as a user's process would import it

    sys.argv = ["emnist-cnn", *sys.argv[1:]]
    return main(sys.argv[1:])


sys.exit(run_cli())
