"""The layout of a search directory (`emnist-cnn tune --search-dir SEARCH`):

    SEARCH/search.json       what the search is: base config, space, settings, data (a resume must match)
    SEARCH/trials/trial_N/   one run directory per trial
    SEARCH/tune/             Ray Tune's own files for the current start (replaced on every start: a search resumes
                             from its trials' run directories)
    SEARCH/leaderboard.json  the trials ranked on validation, as `tune --json` prints them
    SEARCH/best.toml         the best trial's settings as a config file, for `train --config`
    SEARCH/final/            the winner trained with --final-members members: an ordinary run directory
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import RunDirError
from .files import RunLock, atomic_write_json, atomic_write_text
from .rundir import RunDir

__all__ = ["SearchDir"]


class SearchDir:
    """Paths and records of one search directory."""

    def __init__(self, path) -> None:
        self.path = Path(path)

    @property
    def record_path(self) -> Path:
        return self.path / "search.json"

    @property
    def trials_dir(self) -> Path:
        return self.path / "trials"

    @property
    def tune_dir(self) -> Path:
        return self.path / "tune"

    @property
    def leaderboard_path(self) -> Path:
        return self.path / "leaderboard.json"

    @property
    def best_config_path(self) -> Path:
        return self.path / "best.toml"

    def trial(self, name: str) -> RunDir:
        return RunDir(self.trials_dir / name)

    def final_run(self) -> RunDir:
        return RunDir(self.path / "final")

    def trial_names(self) -> list[str]:
        """Trials that have started (a config.json), in name order."""
        if not self.trials_dir.is_dir():
            return []
        return sorted(p.name for p in self.trials_dir.iterdir() if (p / "config.json").is_file())

    def holds_something_else(self) -> bool:
        """A folder with files but no search.json (its lock file aside: a first start may die before writing it)."""
        return (self.path.is_dir() and any(p.name != ".lock" for p in self.path.iterdir())
                and not self.record_path.is_file())

    def lock(self) -> RunLock:
        """Held while a `tune` process works here: a second one is refused."""
        return RunLock(self.path, busy=f"{self.path}: another emnist-cnn tune process is searching in this directory")

    def read_record(self) -> dict[str, Any] | None:
        if not self.record_path.is_file():
            return None
        try:
            return json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{self.record_path}: unreadable search record ({exc})") from None

    def write_record(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.record_path, record)

    def write_leaderboard(self, board: dict[str, Any]) -> None:
        atomic_write_json(self.leaderboard_path, board)

    def write_best_config(self, text: str) -> None:
        atomic_write_text(self.best_config_path, text)
