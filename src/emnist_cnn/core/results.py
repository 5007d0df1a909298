"""What an evaluation and a comparison found, as typed objects holding `ErrorRate`s.

`to_json` is the one writer of their keys (`evaluation.json`, `evaluate --json`,
`compare --json`); `from_json` reads an evaluation back. The tables and the
report format these objects; nothing flattens an `ErrorRate` on the way up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .metrics import ErrorRate
from .stats import McNemarResult

__all__ = ["ModelErrors", "BestK", "EnsembleEvaluation", "Evaluation", "ChosenEnsemble", "Comparison",
           "rate_to_json"]


def rate_to_json(rate: ErrorRate, prefix: str = "", interval: bool = True) -> dict:
    """An error rate's JSON keys: `<prefix>error_pct`, `<prefix>n_errors` and, with `interval`,
    `<prefix>error_ci_pct`."""
    out = {f"{prefix}error_pct": rate.pct, f"{prefix}n_errors": rate.n_errors}
    if interval:
        out[f"{prefix}error_ci_pct"] = list(rate.interval_pct)
    return out


@dataclass(frozen=True)
class ModelErrors:
    """One model's errors (a member's or an ensemble's) on the evaluated split, and on validation if any."""

    name: str
    error: ErrorRate
    val: ErrorRate | None = None

    def to_json(self, named: bool = True) -> dict:
        out = {"name": self.name} if named else {}
        out.update(rate_to_json(self.error))
        if self.val is not None:
            out.update(rate_to_json(self.val, "val_", interval=False))
        return out

    @classmethod
    def from_json(cls, row: Mapping, n: int, n_val: int, name: str | None = None) -> ModelErrors:
        val = ErrorRate(int(row["val_n_errors"]), n_val) if "val_n_errors" in row else None
        return cls(str(row.get("name", name)), ErrorRate(int(row["n_errors"]), n), val)


@dataclass(frozen=True)
class BestK:
    """The ensemble of the k members ranked best on validation."""

    k: int
    members: tuple[str, ...]
    val: ErrorRate
    error: ErrorRate

    def to_json(self) -> dict:
        return {"k": self.k, "members": list(self.members), **rate_to_json(self.val, "val_", interval=False),
                **rate_to_json(self.error, interval=False)}

    @classmethod
    def from_json(cls, row: Mapping, n: int, n_val: int) -> BestK:
        return cls(int(row["k"]), tuple(str(m) for m in row.get("members", ())),
                   ErrorRate(int(row["val_n_errors"]), n_val), ErrorRate(int(row["n_errors"]), n))


@dataclass(frozen=True)
class EnsembleEvaluation:
    """Members and their mean on one split; with validation outputs, the choices made on validation.

    `best_member`, `versus_best_member` (McNemar, A = the ensemble, B = that member) and
    `best_k` exist only with a validation split. `dropout`, `epoch` and `tta` say
    which checkpoint of a run it is (None outside a run); `files`, what was written.
    """

    members: tuple[ModelErrors, ...]
    ensemble: ModelErrors
    best_member: ModelErrors | None = None
    versus_best_member: McNemarResult | None = None
    best_k: tuple[BestK, ...] = ()
    dropout: float | None = None
    epoch: int | None = None
    tta: int | None = None
    files: Mapping[str, str] | None = None

    @property
    def n(self) -> int:
        return self.ensemble.error.n

    @property
    def n_val(self) -> int:
        return self.ensemble.val.n if self.ensemble.val is not None else 0

    def to_json(self) -> dict:
        out = {key: value for key, value in (("dropout", self.dropout), ("epoch", self.epoch), ("tta", self.tta))
               if value is not None}
        out.update(n=self.n, members=[m.to_json() for m in self.members],
                   ensemble=self.ensemble.to_json(named=False))
        if self.ensemble.val is not None:
            out["n_val"] = self.n_val
        if self.best_member is not None:
            out["best_member"] = self.best_member.to_json()
        if self.versus_best_member is not None:
            t = self.versus_best_member
            out["ensemble_vs_best_member"] = {"only_ensemble_wrong": t.only_a, "only_member_wrong": t.only_b,
                                              "p_value": t.p_value}
        if self.best_k:
            out["best_k"] = [b.to_json() for b in self.best_k]
        if self.files is not None:
            out["files"] = dict(self.files)
        return out

    @classmethod
    def from_json(cls, d: Mapping) -> EnsembleEvaluation:
        """An `evaluation.json` read back (intervals are recomputed from the counts)."""
        n, n_val = int(d["n"]), int(d.get("n_val", 0))
        t = d.get("ensemble_vs_best_member")
        best = d.get("best_member")
        return cls(
            members=tuple(ModelErrors.from_json(m, n, n_val) for m in d.get("members", ())),
            ensemble=ModelErrors.from_json(d["ensemble"], n, n_val, name="ensemble"),
            best_member=None if best is None else ModelErrors.from_json(best, n, n_val),
            versus_best_member=None if t is None else McNemarResult(int(t["only_ensemble_wrong"]),
                                                                    int(t["only_member_wrong"]),
                                                                    float(t["p_value"])),
            best_k=tuple(BestK.from_json(b, n, n_val) for b in d.get("best_k", ())),
            dropout=d.get("dropout"), epoch=d.get("epoch"), tta=d.get("tta"), files=d.get("files"))


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` found: `overall` holds every evaluated member together (a run's members of every
    dropout rate, or the weight files given); `ensembles`, a run's ensemble per dropout rate."""

    dataset: str
    split: str
    tta: int
    overall: EnsembleEvaluation
    ensembles: tuple[EnsembleEvaluation, ...] = ()

    @property
    def n(self) -> int:
        return self.overall.n

    def to_json(self) -> dict:
        out = {"dataset": self.dataset, "split": self.split, "tta": self.tta, **self.overall.to_json()}
        if self.ensembles:
            out["ensembles"] = [e.to_json() for e in self.ensembles]
        return out


@dataclass(frozen=True)
class ChosenEnsemble:
    """A run's ensemble chosen on validation at its last checkpoint, and its test error."""

    run: str
    dataset: str
    fingerprint: str
    recipe: str
    dropout: float
    epoch: int
    error: ErrorRate

    def to_json(self) -> dict:
        return {"run": self.run, "dataset": self.dataset, "fingerprint": self.fingerprint, "recipe": self.recipe,
                "dropout": self.dropout, "epoch": self.epoch, **rate_to_json(self.error)}


@dataclass(frozen=True)
class Comparison:
    """Two runs' chosen ensembles on the same test images, and McNemar's exact test between them."""

    a: ChosenEnsemble
    b: ChosenEnsemble
    paired: McNemarResult

    @property
    def n(self) -> int:
        return self.a.error.n

    def to_json(self) -> dict:
        return {"n": self.n, "runs": [self.a.to_json(), self.b.to_json()],
                "paired": {"only_a_wrong": self.paired.only_a, "only_b_wrong": self.paired.only_b,
                           "p_value": self.paired.p_value}}
