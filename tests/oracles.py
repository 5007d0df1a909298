"""Independent readers of a run's results, and the one oracle for "two runs equal to the bit"; read without
the package where they can be, so that a bug in its readers cannot hide one in its writers."""

import csv
import json
import math
from pathlib import Path

import numpy as np


def read_csv(path) -> list[dict[str, str]]:
    """A CSV file's rows as dicts of text, read without the package (an independent oracle)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_errors_csv(path) -> list[dict]:
    """errors.csv rows with typed values: epoch, n_errors, n as int; error_pct as float."""
    return [{"epoch": int(r["epoch"]), "model": r["model"], "split": r["split"], "error_pct": float(r["error_pct"]),
             "n_errors": int(r["n_errors"]), "n": int(r["n"])} for r in read_csv(path)]


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a state file (.npz) or a weights file (.h5), by name: to compare runs to the bit."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def without_seconds(path: Path) -> list[list[str]]:
    """A history CSV's cells without the wall-time column, the one that differs between equal runs."""
    rows = [line.split(",") for line in path.read_text().splitlines()]
    col = rows[0].index("seconds")
    return [r[:col] + r[col + 1:] for r in rows]


def read_tensorboard(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list]]:
    """(folder/tag -> [(step, value)] in file order, folder/tag -> [image events]) via TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = {}, {}
    root = run_dir / "tensorboard"
    for folder in sorted({p.parent for p in root.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        writer = folder.relative_to(root).as_posix()
        for tag in acc.Tags()["scalars"]:
            scalars[f"{writer}/{tag}"] = [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["images"]:
            images[f"{writer}/{tag}"] = acc.Images(tag)
    return scalars, images


def planned_steps(run_dir) -> tuple[int, int]:
    """(steps per member epoch, steps of the whole run) as the run's config.json plans them: an epoch is
    ceil(n_train / batch_size) steps, the run `epochs` of them per member and dropout rate."""

    record = json.loads((Path(run_dir) / "config.json").read_text())
    cfg = record["config"]
    per_epoch = math.ceil(record["data"]["n_train"] / cfg["batch_size"])
    return per_epoch, per_epoch * cfg["epochs"] * cfg["models"] * len(cfg["dropouts"])


def assert_same_arrays(a: dict, b: dict, what: str) -> None:
    """The same named arrays, each of the same dtype, shape and bytes."""
    assert sorted(a) == sorted(b), f"{what}: different arrays"
    for key in b:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, f"{what}: {key}"
        assert a[key].tobytes() == b[key].tobytes(), f"{what}: {key} differs"


def result_files(run: Path) -> dict[str, Path]:
    """Every result file of a run, by its path in the run: not the logs of when, where and how it ran
    (config.json, invocations, locks, Ray segments, what a tracking sink such as MLflow received) and not
    TensorBoard (compared by its values)."""
    skip = {"config.json", "invocations.jsonl", ".lock"}
    return {str(p.relative_to(run)): p for p in sorted(Path(run).rglob("*"))
            if p.is_file() and p.name not in skip
            and not {".locks", "tensorboard", "tracking"} & set(p.relative_to(run).parts)
            and "segments_" not in p.name}


def assert_same_run(run: Path, expected: Path, *, tensorboard: bool = False) -> dict[str, int]:
    """Two runs' results equal to the bit: histories (the wall-time column aside), errors.csv, the text and
    mistake tables byte for byte, every checkpoint and state array for array; with `tensorboard`, every
    TensorBoard point the same (wall time aside). Returns how many files of each kind were compared."""
    if tensorboard:
        tb, tb_expected = (read_tensorboard(r)[0] for r in (run, expected))
        assert sorted(tb) == sorted(tb_expected)
        for key, points in tb_expected.items():
            if not key.endswith("epoch/seconds"):
                assert tb[key] == points, key
    a, b = result_files(run), result_files(expected)
    assert sorted(a) == sorted(b)
    kinds = {"history": 0, "errors": 0, "misclassified": 0, "text": 0, "weights": 0, "state": 0}
    for rel, pb in b.items():
        pa = a[rel]
        if "/history/model_" in rel and rel.endswith(".csv"):
            assert without_seconds(pa) == without_seconds(pb), rel  # the wall time of an epoch may differ
            kinds["history"] += 1
        elif rel.endswith((".csv", ".txt")):
            assert pa.read_bytes() == pb.read_bytes(), rel
            kinds["errors" if rel.endswith("errors.csv") else "misclassified" if "misclassified_" in rel
                  else "text"] += 1
        elif rel.endswith((".npz", ".h5")):
            assert_same_arrays(arrays(pa), arrays(pb), rel)
            kinds["state" if rel.endswith(".npz") else "weights"] += 1
        else:
            raise AssertionError(f"unexpected result file {rel}")
    return kinds
