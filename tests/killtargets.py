"""The functions tests/killwrap.py may patch to count calls and kill the CLI, each named as its callers look it up:
the one list of kill targets (tests/test_killpoints.py, tests/test_tracking.py)."""

import importlib

REPLACE = "os.replace"  # every file of the run is put in place by a rename
WRITE = "emnist_cnn.io.files.atomic_write_bytes"  # a file's bytes, before its rename (not the states': WRITE_STATE)
STEP = "emnist_cnn.core.trainer.train_step"  # one training step (of a member, or of fused members)
EVALUATE = "emnist_cnn.training.train.evaluate_checkpoint"  # a checkpoint's ensemble evaluation
SAVE_STATE = "emnist_cnn.training.members.put_member_state"  # a member's resumable state, put in place
WRITE_STATE = "emnist_cnn.training.members.write_temp_file"  # a state's bytes, in a writer thread
SAVE_WEIGHTS = "emnist_cnn.training.members.save_weights_atomic"  # a member's checkpoint weights
WRITE_CSV = "emnist_cnn.io.rundir.write_csv_rows"  # a table of the run (errors, mistakes)
TRACKER_SYNC = "emnist_cnn.training.tracking.Tracker.sync"  # the tracker catching up with the run's records
MLFLOW_SENT = "emnist_cnn.training.tracking._MlflowSink._mark_sent"  # what MLflow has, recorded as sent

RUN_FILES = (REPLACE, WRITE, STEP, EVALUATE, SAVE_STATE, WRITE_STATE, SAVE_WEIGHTS, WRITE_CSV)  # the kill-point sweep's
ALL = (*RUN_FILES, TRACKER_SYNC, MLFLOW_SENT)


def resolve(target: str):
    """(the object holding it, its attribute name) for a dotted target, as killwrap.py patches it."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1]
    raise LookupError(target)
