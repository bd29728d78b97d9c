"""Every gradient estimator, by name: the lifecycle they share is `metasolve.method.estimator`.

- `ForwardGradient`, `SPSA`, `FiniteDifference` (`forward_gradient.py`): finite differences
  along random or coordinate tangents;
- `ControlVariate` (`control_variate.py`): a forward gradient corrected by a learned surrogate;
- `ScoreFunction` (`score_function.py`): discrete settings (which solver, which restart);
- `Exact` (`exact_gradient.py`): a differentiable twin's exact gradient, the reference.
"""
from __future__ import annotations

from metasolve.method.control_variate import ControlVariate
from metasolve.method.estimator import Deferred, Estimator
from metasolve.method.exact_gradient import Exact
from metasolve.method.forward_gradient import SPSA, FiniteDifference, ForwardGradient
from metasolve.method.score_function import ScoreFunction

__all__ = ["SPSA", "ControlVariate", "Deferred", "Estimator", "Exact", "FiniteDifference", "ForwardGradient",
           "ScoreFunction"]
