"""The search space file of `emnist-cnn tune`: what it may vary, how, and the one line a bad file gets."""

import pytest

from conftest import run_cli
from emnist_cnn.config import SearchSettings, TrainConfig
from emnist_cnn.errors import ConfigError
from emnist_cnn.io.search_space import TUNABLE, Dimension, apply_sample, read_search_space

BASE = TrainConfig.from_preset("quick", dataset="mnist")

GOOD = """
dropout = [0.2, 0.3, 0.5]
lr = {loguniform = [1e-4, 3e-3]}
recipe = ["reference", "fast"]
batch_size = [64, 128]
[augment]
rotation_deg = {uniform = [0, 15]}
zoom_min = [0.8, 0.9]
zoom_max = {uniform = [1.0, 1.2]}
"""


def write(tmp_path, text):
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def test_a_space_reads_lists_as_choices_and_tables_as_ranges_in_file_order(tmp_path):
    space = read_search_space(write(tmp_path, GOOD), BASE)
    assert space.dimensions == (
        Dimension("dropout", "choice", (0.2, 0.3, 0.5)), Dimension("lr", "loguniform", (1e-4, 3e-3)),
        Dimension("recipe", "choice", ("reference", "fast")), Dimension("batch_size", "choice", (64, 128)),
        Dimension("augment.rotation_deg", "uniform", (0.0, 15.0)),
        Dimension("augment.zoom_min", "choice", (0.8, 0.9)), Dimension("augment.zoom_max", "uniform", (1.0, 1.2)))
    assert set(space.to_dict()) <= set(TUNABLE)


def test_a_sample_changes_exactly_its_settings():
    """A trial's config is the base with its sample: one dropout rate, the augmentation merged, nothing else."""
    config = apply_sample(BASE, {"dropout": 0.35, "lr": 5e-4, "augment.rotation_deg": 7.5, "batch_size": 64})
    assert config.dropouts == (0.35,) and config.lr == 5e-4 and config.batch_size == 64
    assert config.augment.rotation_deg == 7.5 and config.augment.shift_frac == BASE.augment.shift_frac
    assert config.replace(dropouts=BASE.dropouts, lr=BASE.lr, batch_size=BASE.batch_size,
                          augment=BASE.augment) == BASE


@pytest.mark.parametrize("text, words", [
    ("dropout = [0.2\n", ["not valid TOML"]),
    ("learning_rate = [0.1]\n", ["learning_rate is not a setting", "dropout, lr, recipe"]),
    ("seed = [0, 1]\n", ["seed cannot vary in a search"]),
    ("models = [1, 2]\n", ["models cannot vary in a search"]),
    ("[augment]\nfill_mode = [\"nearest\", \"wrap\"]\n", ["augment.fill_mode cannot vary in a search"]),
    ("[augment]\nspin = [1.0]\n", ["augment.spin is not a setting"]),
    ("dropout = []\n", ["dropout is an empty list"]),
    ("lr = {uniform = [0.01, 0.001]}\n", ["lr: uniform range [0.01, 0.001] is empty"]),
    ("lr = {loguniform = [0, 0.01]}\n", ["lr: loguniform needs low > 0"]),
    ("lr = {normal = [0, 1]}\n", ["lr must be a list of values or one of"]),
    ("batch_size = {uniform = [32, 256]}\n", ["batch_size takes a list of values, not a uniform range"]),
    ("dropout = [0.2, 1.5]\n", ["dropout = 1.5: must be in [0, 1)"]),
    ("recipe = [\"reference\", \"slow\"]\n", ["recipe = 'slow': must be one of reference, fast"]),
    ("batch_size = [64, 64]\n", ["batch_size lists a value twice"]),
    ("dropout = [\"high\"]\n", ["dropout values must be a number, got 'high'"]),
    ("[augment]\nzoom_min = {uniform = [0.9, 1.2]}\nzoom_max = [1.1]\n",
     ["augment.zoom_min can exceed augment.zoom_max (1.2 > 1.1)"]),
    ("\n", ["the space varies nothing"]),
])
def test_a_bad_space_is_one_line_naming_the_file_and_the_key(tmp_path, text, words):
    """Each way a space can be wrong, caught before any trial: broken TOML, an unknown key, a setting that
    defines the data or the trial, an empty list or range, a distribution where only values make sense, a value
    out of its setting's range, and zoom ranges that would give zoom_min > zoom_max."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_search_space(path, BASE)
    message = str(info.value)
    assert message.startswith(f"{path}:") or message.startswith(f"--space {path}"), message
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_tune_refuses_a_bad_space_or_setting_in_one_line_and_writes_nothing(tmp_path, capsys):
    """The command checks the space and its flags before it opens anything: exit 2, one line, no search dir."""
    search = tmp_path / "search"
    bad = write(tmp_path, "seed = [0, 1]\n")
    assert run_cli(["tune", "--search-dir", search, "--space", bad, "--dataset", "mnist"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed cannot vary in a search" in err[0], err
    good = write(tmp_path, GOOD)
    assert run_cli(["tune", "--search-dir", search, "--space", good, "--grace-epochs", "5", "--max-epochs",
                    "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--grace-epochs must be in [1, --max-epochs]" in err[0], err
    assert not search.exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert run_cli(["tune", "--search-dir", tmp_path / "other", "--space", good, "--dataset", "mnist",
                    "--data-dir", tmp_path / "nowhere", "--no-download"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds files but no search.json" in err[0], err
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("changes, flag", [({"trials": 0}, "--trials"), ({"reduction_factor": 1},
                                                                          "--reduction-factor"),
                                           ({"members_per_trial": 0}, "--members-per-trial"),
                                           ({"concurrent": 0}, "--concurrent")])
def test_search_settings_name_their_flag(changes, flag):
    with pytest.raises(ConfigError, match=f"^{flag} must be"):
        SearchSettings(**changes)


def test_a_trial_and_the_winner_train_one_dropout_rate_whatever_the_base_has():
    """A base with four rates (the reference preset) gives each trial its first rate unless the space varies
    it: a trial reports one ensemble's validation error per epoch. Catches a trial training four ensembles, whose
    reports would run epochs 1..E four times over."""
    from emnist_cnn.training.search import TrialResult, build_final_config, build_trial_config

    base = TrainConfig.from_preset("reference")
    settings = SearchSettings(trials=4, max_epochs=3, grace_epochs=1)
    trial = build_trial_config(base, settings, {"lr": 5e-4})
    assert (trial.dropouts, trial.models, trial.epochs, trial.checkpoint_every, trial.lr) == ((0.2,), 1, 3, 1, 5e-4)
    assert build_trial_config(base, settings, {"dropout": 0.4}).dropouts == (0.4,)
    best = TrialResult("trial_00001", {"lr": 5e-4}, 3, None, frozenset())
    final = build_final_config(base, settings, best)
    assert (final.dropouts, final.models, final.epochs, final.lr) == ((0.2,), 10, 3, 5e-4)


def test_a_second_tune_on_a_search_directory_in_use_is_refused_in_one_line(tmp_path, capsys):
    from emnist_cnn.io.searchdir import SearchDir

    search = tmp_path / "search"
    space = write(tmp_path, GOOD)
    with SearchDir(search).lock():
        code = run_cli(["tune", "--search-dir", search, "--space", space, "--dataset", "mnist"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "another emnist-cnn tune process is searching" in err[0], err
