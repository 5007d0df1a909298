"""Recipes: the fast recipe's schedule reaches the optimizer at every step, fused or not, and is part of the
experiment (a new --epochs is refused unless a fixed --lr replaces the schedule); `compare` pairs two runs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import trains_a_model
from oracles import planned_steps, read_csv
from emnist_cnn.demos import make_tiny_digits, write_mnist_idx
from emnist_cnn.config import RECIPES, DataSource, Recipe, TrainConfig, TrainOptions
from emnist_cnn.core import trainer as trainer_module
from emnist_cnn.core.schedule import WARMUP_START, build_epoch_rates, build_step_rates, learning_rate_at
from emnist_cnn.errors import ConfigError
from emnist_cnn.io.datasets import load_dataset
from emnist_cnn.training.train import train_and_evaluate
from emnist_cnn.io.rundir import RunDir
from emnist_cnn.present.summary import find_fixed_lr_phase, load_recipe_rates

FAST = TrainConfig(dataset="mnist", dropouts=(0.3,), models=2, epochs=2, checkpoint_every=1, batch_size=64,
                   val_fraction=0.2, bn_recalibration_images=200, recipe="fast")


def test_schedule_warms_up_then_decays_linearly_to_zero():
    cfg = TrainConfig(recipe="fast", epochs=4, lr=1e-3)
    peak = 1e-3 * RECIPES["fast"].lr_scale
    n = 10  # steps per epoch: 40 in all, warm-up round(0.1 x 40) = 4 of them
    rates = [learning_rate_at(cfg, e, s, n) for e in range(1, 5) for s in range(n)]
    assert rates[0] == pytest.approx(WARMUP_START * peak)
    assert rates[2] == pytest.approx(peak * (WARMUP_START + (1 - WARMUP_START) * 2 / 4))
    assert rates[4] == pytest.approx(peak)  # the peak, then a straight line to zero after the last step
    assert rates[-1] == pytest.approx(peak / 36) and rates[-1] > 0
    assert np.allclose(np.diff(rates[4:]), -peak / 36)
    assert np.all(np.diff(rates[:5]) > 0)
    # What a history row records: the epoch's last step.
    assert build_epoch_rates(cfg, 10 * cfg.batch_size - 5)(2) == rates[19]
    # The reference recipe: the base rate at every step, whatever the run's length.
    ref = TrainConfig(lr=1e-3)
    assert {learning_rate_at(ref, e, s, 7) for e in (1, 100) for s in (0, 6)} == {1e-3}


@pytest.mark.parametrize("recipe", [RECIPES["fast"], Recipe(warmup_frac=0.25), Recipe(decay="linear"),
                                    Recipe(lr_scale=2.0)], ids=["fast", "warm-up only", "decay only", "constant"])
def test_the_step_table_is_the_schedule_to_the_bit(recipe, monkeypatch):
    # The trainer's table (built in one pass) against the rate of each step, as resuming reads it.
    monkeypatch.setitem(RECIPES, "candidate", recipe)
    cfg = TrainConfig(recipe="candidate", epochs=7, batch_size=64)
    n_train = 13 * 64 - 5  # 13 steps per epoch, the last short
    table = build_step_rates(cfg, n_train)
    assert table.dtype == np.float32 and len(table) == 7 * 13
    expected = np.array([learning_rate_at(cfg, e, s, 13) for e in range(1, 8) for s in range(13)], np.float32)
    np.testing.assert_array_equal(table, expected)


@pytest.fixture(scope="module")
@trains_a_model
def fast_runs(tmp_path_factory):
    """FAST trained one member at a time and fused, with the learning rate each train step read."""
    root = tmp_path_factory.mktemp("recipes")
    data = write_mnist_idx(root / "data", *make_tiny_digits())
    seen = {"seq": [], "fused": []}
    original = trainer_module.train_step
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMNIST_CNN_CACHE", str(root / "cache"))
        ds = load_dataset("mnist", data)
        for name, fused in (("seq", False), ("fused", True)):
            def recording(trainer, xs, ys, weights, _name=name):
                # The rate the optimizer applies at this step (its schedule read at its step count).
                seen[_name].append(float(keras.ops.convert_to_numpy(trainer.optimizer.learning_rate)))
                return original(trainer, xs, ys, weights)

            mp.setattr(trainer_module, "train_step", recording)
            train_and_evaluate(FAST, root / name, DataSource(dataset=ds), TrainOptions(verbose=0, fused=fused))
    return root, data, seen


def test_fast_schedule_reaches_the_optimizer_at_every_step(fast_runs):
    root, _, seen = fast_runs
    per_epoch, total = planned_steps(root / "seq")
    expected = [np.float32(learning_rate_at(FAST, e, s, per_epoch)) for e in (1, 2) for s in range(per_epoch)]
    # One at a time: member 0's epoch 1, member 1's epoch 1, then epoch 2 likewise.
    assert len(seen["seq"]) == total
    assert seen["seq"] == expected[:per_epoch] * 2 + expected[per_epoch:] * 2
    # Fused: one step trains both members, at the same rates.
    assert seen["fused"] == expected
    assert len(set(expected)) == len(expected)  # a new rate every step, so the checks above have teeth
    # Each history row records its epoch's last rate, and no epoch counts as a fixed-rate phase.
    rows = read_csv(root / "seq" / "dropout_0.3" / "history" / "model_0.csv")
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx([expected[per_epoch - 1], expected[-1]],
                                                                       rel=1e-5)
    run = RunDir(root / "seq")
    assert find_fixed_lr_phase(run.read_histories(0.3, 2), load_recipe_rates(run)) is None


@pytest.mark.cpu_facts
def test_fast_recipe_fused_equals_one_at_a_time(fast_runs):
    from test_fused import assert_same_run

    root, _, _ = fast_runs
    assert_same_run(root / "fused", root / "seq")


def test_fast_schedule_length_is_part_of_the_experiment(fast_runs, tmp_path):
    """Raising --epochs would change every remaining step's rate: refused, unless a fixed --lr replaces it."""
    root, data, _ = fast_runs
    run = tmp_path / "run"
    shutil.copytree(root / "seq", run)
    ds = load_dataset("mnist", data, cache=False)
    before = (run / "config.json").read_bytes()
    refusal = "fast recipe's learning rate schedule in .* spans 2 epochs; train to 2, or past it with a fixed --lr"
    with pytest.raises(ConfigError, match=refusal):
        train_and_evaluate(FAST.replace(epochs=3), run, DataSource(dataset=ds), TrainOptions(verbose=0))
    assert (run / "config.json").read_bytes() == before
    train_and_evaluate(FAST.replace(epochs=3), run, DataSource(dataset=ds), TrainOptions(verbose=0, fixed_lr=1e-5))
    rows = read_csv(run / "dropout_0.3" / "history" / "model_0.csv")
    assert [float(r["learning_rate"]) for r in rows][2] == pytest.approx(1e-5)
    r = RunDir(run)
    # Epochs 1-2 stay on the 2-epoch schedule they were trained with; epoch 3 is the fixed-rate phase.
    assert find_fixed_lr_phase(r.read_histories(0.3, 2), load_recipe_rates(r)) == (2, 3, [1e-5])
    # Going on without --lr would put the schedule's rate on epochs past it: refused too.
    with pytest.raises(ConfigError, match=refusal):
        train_and_evaluate(FAST.replace(epochs=4), run, DataSource(dataset=ds), TrainOptions(verbose=0))


def with_test_mistakes(run, dst, dropout: str, wrong: list[int]):
    """A copy of `run` whose records say its ensemble got exactly the test images `wrong` wrong at its last
    checkpoint (the tiny synthetic digits are too easy for the two recipes to disagree on their own); `run`
    itself when `dst` is `run`."""
    if Path(run) != Path(dst):
        shutil.copytree(run, dst)
    hist = dst / f"dropout_{dropout}" / "history"
    rows = read_csv(hist / "errors.csv")
    last = max(int(r["epoch"]) for r in rows)
    for r in rows:
        if int(r["epoch"]) == last and r["model"] == "ensemble" and r["split"] == "test":
            r["n_errors"], r["error_pct"] = str(len(wrong)), f"{100 * len(wrong) / int(r['n']):.4f}"
    with open(hist / "errors.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    lines = ["split,index,label,predicted"] + [f"test,{i},0,1" for i in wrong]
    (hist / f"misclassified_epoch_{last:03d}.csv").write_text("\n".join(lines) + "\n")
    return dst


def test_compare_pairs_two_recipes_on_the_same_test_images(fast_runs, tiny_run, tmp_path, capsys):
    """`compare`: each run's chosen ensemble, and McNemar's exact test on exactly the images one gets wrong."""
    from scipy.stats import binomtest

    from conftest import run_cli

    a = with_test_mistakes(tiny_run[0], tmp_path / "a", "0.2", list(range(15)))
    b = with_test_mistakes(fast_runs[0] / "seq", tmp_path / "b", "0.3", [0, 1, 100])
    assert run_cli(["compare", "--run-dir", a, b]) == 0
    out = capsys.readouterr().out
    p = binomtest(13, 14, 0.5).pvalue  # 13 images wrong only in A, 1 only in B
    assert f"13 wrong only in A, 1 only in B; McNemar exact p = {p:.3g} (a real difference at the 5% level)" in out
    assert "7.500% (15/200; 95% CI" in out and "1.500% (3/200; 95% CI" in out
    assert " reference " in out and " fast " in out
    assert run_cli(["compare", "--run-dir", a, b, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["recipe"] for r in result["runs"]] == ["reference", "fast"]
    assert [r["n_errors"] for r in result["runs"]] == [15, 3]
    assert result["paired"] == {"only_a_wrong": 13, "only_b_wrong": 1, "p_value": pytest.approx(p)}
    # The real runs as trained: the same verdict from their own records.
    assert run_cli(["compare", "--run-dir", tiny_run[0], fast_runs[0] / "seq"]) == 0
    assert "McNemar exact p = " in capsys.readouterr().out


def test_compare_chooses_each_runs_dropout_rate_on_validation_not_test(tiny_run, tmp_path, capsys):
    """A run of two rates whose records disagree: 0.3 is best on validation, 0.2 on test. `compare` pairs the
    0.3 ensemble, as `evaluate` and `export` would. Catches the choice made on test rows (issue 28, #4)."""
    from conftest import run_cli

    two = tmp_path / "two"
    shutil.copytree(tiny_run[0], two)
    shutil.copytree(two / "dropout_0.2", two / "dropout_0.3")
    record = json.loads((two / "config.json").read_text())
    record["config"]["dropouts"] = [0.2, 0.3]
    (two / "config.json").write_text(json.dumps(record))
    for dropout, val_errors, wrong in (("0.2", 9, [3]), ("0.3", 2, [0, 1, 2, 5])):
        with_test_mistakes(two, two, dropout, wrong)
        hist = two / f"dropout_{dropout}" / "history"
        rows = read_csv(hist / "errors.csv")
        last = max(int(r["epoch"]) for r in rows)
        for r in rows:
            if int(r["epoch"]) == last and r["model"] == "ensemble" and r["split"] == "val":
                r["n_errors"], r["error_pct"] = str(val_errors), f"{100 * val_errors / int(r['n']):.4f}"
        with open(hist / "errors.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
    assert run_cli(["compare", "--run-dir", two, tiny_run[0], "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)["runs"][0]
    assert (chosen["dropout"], chosen["n_errors"]) == (0.3, 4)


def test_compare_refuses_runs_on_other_test_images(fast_runs, tmp_path, capsys):
    from conftest import run_cli

    other = tmp_path / "other"
    shutil.copytree(fast_runs[0] / "seq", other)
    record = json.loads((other / "config.json").read_text())
    record["data"]["fingerprint"] = "0" * 64
    (other / "config.json").write_text(json.dumps(record))
    assert run_cli(["compare", "--run-dir", fast_runs[0] / "seq", other]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "were tested on different images" in err
    assert run_cli(["compare", "--run-dir", fast_runs[0] / "seq", tmp_path / "missing"]) != 0
    assert "not a run directory" in capsys.readouterr().err
    # A per-image record that disagrees with errors.csv is named, not trusted.
    broken = with_test_mistakes(fast_runs[0] / "seq", tmp_path / "broken", "0.3", [4, 5])
    (broken / "dropout_0.3" / "history" / "misclassified_epoch_002.csv").write_text("split,index,label,predicted\n")
    assert run_cli(["compare", "--run-dir", fast_runs[0] / "seq", broken]) == 1
    assert "holds 0 wrong test images, errors.csv counts 2" in capsys.readouterr().err


def test_presets_take_a_recipe_and_reference_fast_is_the_reference_sweep_on_the_fast_recipe():
    from emnist_cnn.config import PRESETS

    ref, fast = TrainConfig.from_preset("reference"), TrainConfig.from_preset("reference-fast")
    assert (ref.recipe, fast.recipe) == ("reference", "fast")
    # Only the recipe, its length and its batch size differ.
    assert fast.replace(recipe="reference", epochs=ref.epochs, batch_size=ref.batch_size) == ref
    assert fast.epochs < ref.epochs and fast.epochs % fast.checkpoint_every == 0
    assert (TrainConfig.from_preset("quick", recipe="fast").recipe, "recipe" in PRESETS["quick"]) == ("fast", False)


def test_the_fast_recipe_brings_its_batch_size_unless_one_is_given(tmp_path):
    """A new run: an explicit --batch-size, else the recipe's (fast: 64), else the preset's (quick: 128), else
    512. A resumed run keeps the batch size it was started with."""
    from emnist_cnn.cli.commands import config_from_args
    from emnist_cnn.cli.main import build_parser

    assert RECIPES["fast"].batch_size == 64 and RECIPES["reference"].batch_size is None
    assert [TrainConfig.from_preset("quick", **c).batch_size for c in
            ({}, {"recipe": "fast"}, {"recipe": "fast", "batch_size": 100})] == [128, 64, 100]
    assert (TrainConfig.from_preset("reference").batch_size, TrainConfig.from_preset("reference-fast").batch_size,
            TrainConfig(recipe="fast").batch_size) == (512, 64, 512)  # a config built directly is as given

    def batch(*argv):
        parser = build_parser()
        args = parser.parse_args(list(map(str, argv)))
        return config_from_args(args, getattr(args, "preset", None)).batch_size

    new = tmp_path / "new"
    assert [batch("train", "--run-dir", new, *flags) for flags in
            ([], ["--recipe", "fast"], ["--recipe", "fast", "--batch-size", "256"])] == [512, 64, 256]
    assert [batch("run", "--run-dir", new, *flags) for flags in
            ([], ["--recipe", "fast"], ["--preset", "reference", "--recipe", "fast"],
             ["--preset", "reference-fast", "--recipe", "reference"])] == [128, 64, 64, 512]
    assert TrainConfig.from_preset("reference-fast", recipe="reference").batch_size == 512
    started = RunDir(tmp_path / "started")  # a fast run started at batch 200: resuming keeps it
    started.path.mkdir()
    started.write_record({"config": FAST.replace(batch_size=200).to_dict(), "data": {}})
    assert batch("train", "--run-dir", started.path, "--epochs", "3") == 200
    assert batch("run", "--run-dir", started.path, "--preset", "quick") == 200
