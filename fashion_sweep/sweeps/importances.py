"""fANOVA's parameter importances (seeded), computed once for the sweep's static and
interactive plots. A module of its own, imported where the plots are made: importing
optuna.importance imports scikit-learn, which was 0.9 s of every sweep's start-up."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.importance import BaseImportanceEvaluator, FanovaImportanceEvaluator


class Importances(BaseImportanceEvaluator):
    def __init__(self) -> None:
        self.evaluator = FanovaImportanceEvaluator(seed=0)
        self.found: dict[Any, dict[str, float]] = {}

    def evaluate(self, study: optuna.Study, params: Any = None, *, target: Any = None) -> Any:
        key = (tuple(params or ()), target)
        if key not in self.found:
            self.found[key] = self.evaluator.evaluate(study, params, target=target)
        return self.found[key]
