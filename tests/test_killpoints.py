"""Kill-and-resume harness: kill `emnist-cnn train` at chosen points, resume it with the plain command,
and require the result to be the uninterrupted run's, bit for bit.

A small wrapper script (tests/killwrap.py) runs the real CLI in a subprocess with one function
patched to kill its own process at its Nth call, before or after the real call, with SIGKILL (nothing runs
afterwards) or SIGINT (Ctrl-C: Python raises KeyboardInterrupt where the signal lands, and every `finally`
and `except BaseException` on the way up runs). Patched functions:

- `os.replace`: a file of the run (config, invocations, checkpoint weights, history, state, errors table,
  the reference's text table) is written to its temporary name but not renamed ("before"), or renamed
  ("after"); for the state this includes the rename of the latest state to `.prev.npz`;
- `emnist_cnn.io.files.atomic_write_bytes`: the same at the level of one whole table or state file;
- `emnist_cnn.core.trainer.train_step`: mid-epoch;
- `emnist_cnn.training.train.evaluate_checkpoint`: while the ensemble is evaluated at a checkpoint;
- `emnist_cnn.training.members.put_member_state` and `save_weights_atomic`, `emnist_cnn.io.rundir.write_csv_rows`:
  around whole saves;
- `emnist_cnn.training.members.write_temp_file`: a state's bytes, written in a background thread while the
  members are validated (SIGKILL only: a Ctrl-C always lands in the main thread).

After the kill, the same command runs once and must succeed, training no more than what the kill left
undone: its training steps (`emnist_cnn.core.trainer.train_step` calls, counted by the wrapper) are at most the
uninterrupted run's minus those the killed run had taken, plus one epoch (the one in flight). A resume that
started again from epoch 0 would give the same bits, so only this count shows that nothing finished is
recomputed. Then every history CSV must hold each epoch exactly once, in order, equal to the uninterrupted
run's (but for the `seconds` column); `errors.csv` and the per-checkpoint text tables must be
byte-identical; every checkpoint must load and hold the same arrays; the members' state files (weights, Adam
state, dropout RNG, metadata) must be identical to the bit; no temporary file may be left.

The run uses the fast recipe, whose learning rate changes at every step. CI runs 5 kill points: renames
and whole-file writes with both signals, and Ctrl-C mid-epoch (about 4 minutes on 2 busy cores).
`EMNIST_CNN_KILL_POINTS=all` sweeps every call of every patched function instead (155 points, about 42
minutes). Kill points are chosen on the uninterrupted run's calls (by file name or position), so they keep
their meaning if training reorders its work.

"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import warmstart

from oracles import arrays, assert_same_arrays, planned_steps, read_csv, read_tensorboard
from emnist_cnn.demos import make_tiny_digits, write_mnist_idx
from killtargets import (EVALUATE, REPLACE, RUN_FILES, SAVE_STATE, SAVE_WEIGHTS, STEP, WRITE, WRITE_CSV,
                         WRITE_STATE)

pytestmark = [pytest.mark.trains, pytest.mark.cpu_facts]  # to the bit (and the CPU chosen): CPU facts

# --no-fused: members train one at a time on any machine (the default on a CPU), so every
# emnist_cnn.core.trainer.train_step call is one member's step.
RUN_ARGS = ["--dataset", "mnist", "--dropout", "0.2", "--models", "2", "--epochs", "2", "--checkpoint-every", "1",
            "--batch-size", "32", "--val-fraction", "0.2", "--bn-recalibration", "100", "--quiet", "--no-fused",
            # A new learning rate at every step (warm-up, then decay), set from the step count: a resume that
            # restored the optimizer's step count wrongly would train on other rates. The reference recipe's
            # constant rate resumes to the bit in tests/test_fused.py and test_backends.py.
            "--recipe", "fast"]

WRAPPER = Path(__file__).with_name("killwrap.py")  # the CLI with patched functions (see its docstring)
TARGETS = RUN_FILES


@dataclass(frozen=True)
class KillPoint:
    """Where to kill: the Nth call of `target`, or the call whose file is `name` (its `occurrence`-th), or
    the call `fraction` of the way through; chosen on the uninterrupted run's calls, so the points stay
    meaningful when training changes its order of work."""

    target: str
    when: str  # "before" or "after" the real call
    how: str  # "SIGKILL" or "SIGINT"
    n: int | None = None
    name: str | None = None  # the last file-name argument (os.replace: the destination)
    occurrence: int = 1
    fraction: float | None = None
    why: str = ""

    @property
    def id(self) -> str:
        short = self.target.rsplit(".", 1)[-1]
        where = (f"#{self.n}" if self.n is not None else
                 f"[{self.name}#{self.occurrence}]" if self.name is not None else f"@{self.fraction:.0%}")
        return f"{short}{where}-{self.when}-{self.how}"

    def resolve(self, calls: list[list[str]]) -> int | None:
        """The call number to kill at, given the uninterrupted run's calls; None if there is no such call."""
        if self.n is not None:
            return self.n if self.n <= len(calls) else None
        if self.name is not None:
            hits = [k for k, names in enumerate(calls, 1) if names and names[-1] == self.name]
            return hits[self.occurrence - 1] if len(hits) >= self.occurrence else None
        return max(1, round(self.fraction * len(calls))) if calls else None


# With 2 members x 2 epochs and checkpoints every epoch, the uninterrupted run renames (os.replace):
# config.json, invocations.jsonl; per member and epoch its checkpoint, history and state (from epoch 2 the
# old state to .prev first); per checkpoint test_errors_epoch_NNN.txt, then errors.csv.
CI_POINTS = [
    KillPoint(REPLACE, "after", "SIGKILL", name="test_errors_epoch_001.txt",
              why="checkpoint 1's text table is in place, errors.csv does not have it yet"),
    KillPoint(REPLACE, "after", "SIGINT", name="model_0.prev.npz",
              why="latest state moved to .prev, the new one not written"),
    KillPoint(REPLACE, "before", "SIGKILL", name="model_0.npz", occurrence=2,
              why="epoch 2's state in its temp file, .prev holds epoch 1's"),
    KillPoint(WRITE, "after", "SIGINT", name="model_1.csv", occurrence=2,
              why="member 1's history has epoch 2, its state still epoch 1"),
    KillPoint(STEP, "after", "SIGINT", fraction=0.4,
              why="mid-epoch: the epoch in flight is trained again from its start, at the same per-step rates"),
]


def sweep_points() -> list[KillPoint]:
    """Every call of every patched function (calls past the run's count are skipped at run time)."""
    points = []
    for n in range(1, 25):
        points += [KillPoint(REPLACE, "before", "SIGKILL", n=n), KillPoint(REPLACE, "after", "SIGKILL", n=n),
                   KillPoint(REPLACE, "before", "SIGINT", n=n)]
    for n in range(1, 19):
        points += [KillPoint(WRITE, "after", "SIGKILL", n=n),
                   KillPoint(WRITE, "before", "SIGINT", n=n)]
    for n in range(1, 25):
        points.append(KillPoint(STEP, "before", "SIGKILL", n=n))
        if n % 2 == 0:
            points.append(KillPoint(STEP, "after", "SIGINT", n=n))
    for n in (1, 2, 3):
        points += [KillPoint(EVALUATE, w, h, n=n)
                   for w, h in (("before", "SIGKILL"), ("after", "SIGKILL"), ("after", "SIGINT"))]
    for n in range(1, 6):
        points += [KillPoint(SAVE_STATE, "before", "SIGKILL", n=n),
                   KillPoint(SAVE_STATE, "after", "SIGINT", n=n),
                   KillPoint(SAVE_WEIGHTS, "before", "SIGINT", n=n),
                   KillPoint(SAVE_WEIGHTS, "after", "SIGKILL", n=n)]
    for n in range(1, 9):
        points.append(KillPoint(WRITE_CSV, "after", "SIGKILL", n=n))
    for n in range(1, 5):
        points += [KillPoint(WRITE_STATE, "before", "SIGKILL", n=n), KillPoint(WRITE_STATE, "after", "SIGKILL", n=n)]
    return points


SWEEP = os.environ.get("EMNIST_CNN_KILL_POINTS", "").strip().lower() == "all"
POINTS = sweep_points() if SWEEP else CI_POINTS


# ----------------------------------------------------------------------------- running the CLI


def _env(cache: Path, **extra) -> dict:
    env = dict(os.environ)
    env.pop("EMNIST_CNN_KILL_SPEC", None)
    env["EMNIST_CNN_CACHE"] = str(cache)  # never the user's ~/.cache (module fixtures run outside conftest's)
    env.update(extra)
    return env


def run_wrapped(harness: dict, args, spec: dict, *, timeout=300) -> subprocess.CompletedProcess:
    """The wrapped CLI in a warm process of its own (tests/warmstart.py), with Python's Ctrl-C handling."""
    return warmstart.run([sys.executable, str(harness["wrapper"]), *map(str, args)], capture_output=True,
                         text=True, timeout=timeout, env=_env(harness["cache"], EMNIST_CNN_KILL_SPEC=json.dumps(spec)))


def start_harness(root: Path, run_args: list[str]) -> dict:
    """Tiny data, the wrapper script, and one uninterrupted run of `run_args` with its call counts."""
    h = {"root": root, "cache": root / "decoded-cache", "wrapper": WRAPPER, "run_args": run_args,
         "data": write_mnist_idx(root / "data", *make_tiny_digits(n_train=200, n_test=60)),
         "baseline": root / "baseline"}
    counts_file = root / "counts.json"
    r = run_wrapped(h, ["train", "--run-dir", h["baseline"], "--data-dir", h["data"], *run_args],
                    {"targets": list(TARGETS), "count_file": str(counts_file), "fired_file": str(root / "never")})
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads(counts_file.read_text())
    return {**h, "counts": record["counts"], "calls": record["calls"]}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return start_harness(tmp_path_factory.mktemp("killpoints"), RUN_ARGS)


# ----------------------------------------------------------------------------- comparing runs


def assert_matches_baseline(run: Path, baseline: Path) -> None:
    d, base = run / "dropout_0.2", baseline / "dropout_0.2"
    # Histories: each epoch once, in order, the same numbers (the wall time aside).
    for i in (0, 1):
        rows = read_csv(d / "history" / f"model_{i}.csv")
        assert [int(r["epoch"]) for r in rows] == [1, 2], f"model_{i}.csv epochs"
        expected = read_csv(base / "history" / f"model_{i}.csv")
        strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
        assert strip(rows) == strip(expected), f"model_{i}.csv differs from the uninterrupted run"
    # errors.csv: complete rows, no duplicates, byte-identical.
    rows = read_csv(d / "history" / "errors.csv")
    keys = [(r["epoch"], r["model"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * 3 * 2, keys
    assert all(all(v not in (None, "") for v in r.values()) for r in rows)
    assert (d / "history" / "errors.csv").read_bytes() == (base / "history" / "errors.csv").read_bytes()
    # The reference's per-checkpoint text tables and the ensemble's mistakes per checkpoint (errors.csv marks
    # a checkpoint evaluated, so a table written after it would be lost for good to a kill between them).
    for epoch in (1, 2):
        for name in (f"test_errors_epoch_{epoch:03d}.txt", f"misclassified_epoch_{epoch:03d}.csv"):
            assert (d / "history" / name).is_file(), f"{name} is missing"
            assert (d / "history" / name).read_bytes() == (base / "history" / name).read_bytes(), name
    # TensorBoard: every epoch and checkpoint once, with the uninterrupted run's values (wall time aside).
    tb, tb_expected = (read_tensorboard(r)[0] for r in (run, baseline))
    assert sorted(tb) == sorted(tb_expected)
    for key, points in tb_expected.items():
        if not key.endswith("epoch/seconds"):
            assert tb[key] == points, key
    # Every checkpoint loads, and holds the uninterrupted run's arrays.
    names = sorted(p.name for p in (d / "weights").iterdir())
    assert names == sorted(p.name for p in (base / "weights").iterdir())
    from emnist_cnn.core.model import build_model

    model = build_model(10, 0.2)
    for name in names:
        model.load_weights(d / "weights" / name)
        assert_same_arrays(arrays(d / "weights" / name), arrays(base / "weights" / name), name)
    # Final states (weights, Adam moments and step, dropout RNG, metadata), bit for bit.
    for i in (0, 1):
        assert_same_arrays(arrays(d / "state" / f"model_{i}.npz"), arrays(base / "state" / f"model_{i}.npz"),
                           f"model_{i}.npz")
    # Nothing half-written is left, and every line of the invocation log is whole.
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".tmp-*"))
    for line in (run / "invocations.jsonl").read_text().splitlines():
        json.loads(line)
    json.loads((run / "config.json").read_text())


# ----------------------------------------------------------------------------- the test


def test_every_ci_kill_point_is_reached_by_an_uninterrupted_run(harness):
    """If training changes its order of work so that a planned point no longer exists, revisit the plan."""
    for point in CI_POINTS:
        assert point.resolve(harness["calls"].get(point.target, [])) is not None, (point, harness["counts"])
    assert harness["counts"][EVALUATE] == 2
    assert harness["counts"][SAVE_STATE] == harness["counts"][WRITE_STATE] == 4
    # Every planned step, and no more: 2 members x 2 epochs x ceil(160 / 32) = 20.
    assert harness["counts"][STEP] == planned_steps(harness["baseline"])[1] == 20


@pytest.mark.parametrize("point", POINTS, ids=[p.id for p in POINTS])
def test_killed_run_resumes_to_the_uninterrupted_result(harness, tmp_path, point):
    kill_and_resume(harness, tmp_path, point)


def kill_and_resume(harness: dict, tmp_path: Path, point: KillPoint) -> None:
    """Kill the harness's run at `point`, resume it with the same command, compare with its baseline."""
    n = point.resolve(harness["calls"].get(point.target, []))
    if n is None:
        pytest.skip(f"no such call in the uninterrupted run ({harness['counts'].get(point.target, 0)} calls)")
    run = tmp_path / "run"
    args = ["train", "--run-dir", run, "--data-dir", harness["data"], *harness["run_args"]]
    fired = tmp_path / "fired.json"
    r = run_wrapped(harness, args, {"targets": sorted({point.target, STEP}), "target": point.target, "n": n,
                                    "when": point.when, "how": point.how, "fired_file": str(fired)})
    assert fired.exists(), f"the kill point never fired: {r.stderr[-2000:]}"
    killed = json.loads(fired.read_text())
    # Steps the killed run took (a step killed before its real call was not taken).
    taken = killed["counts"].get(STEP, 0) - (point.target == STEP and point.when == "before")
    if point.how == "SIGKILL":
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    else:
        assert r.returncode == 130, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        assert "interrupted; finished epochs are saved, run the same command to resume" in r.stderr
        # Ctrl-C unwinds through the writers, which remove their temporary files on the way out.
        assert not list(run.rglob("*.tmp")) and not list(run.rglob(".tmp-*"))
    # The plain command resumes it, at the first attempt (the wrapper only counts the training steps).
    counted = tmp_path / "resume-counts.json"
    r = run_wrapped(harness, args, {"targets": [STEP], "count_file": str(counted), "fired_file": str(fired)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    # Nothing finished is trained again: at most the steps the killed run had not taken, plus the epoch it
    # was in (lost unless its state landed), never a restart (all 20).
    per_epoch, planned = planned_steps(run)
    resumed = json.loads(counted.read_text())["counts"].get(STEP, 0)
    assert planned - taken <= resumed <= planned - taken + per_epoch, \
        f"resume took {resumed} steps after {taken} of {planned} ({per_epoch} per epoch)"
    assert_matches_baseline(run, harness["baseline"])
