"""Parameter spaces: raw, unconstrained θ ↔ solver settings.

Perturbations act on raw θ, never on decoded settings, so one finite-difference step fits every
coordinate; the constraint (an interval, positivity) lives in the smooth decode map.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch


class Part(Protocol):
    dim: int
    expands: bool
    """True when a decoded value is a table of options merged into the setting (a `Choice` of
    tables), not one entry under the part's own name."""

    def decode_tensor(self, raw: torch.Tensor) -> torch.Tensor: ...

    def to_setting(self, value: torch.Tensor) -> Any: ...

    def encode(self, value: Any) -> torch.Tensor: ...


ANCHOR_CLIP = 1e-4
"""How close to its bounds `Interval.encode_clipped` lets a formula's value sit, as a fraction of
the interval: θ stays within ±logit(1 − 1e-4) ≈ ±9.2, where a learned correction can still move
it (the sigmoid's slope there is 1e-4 of its slope at the centre)."""


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class Interval:
    """A scalar in the open interval (lo, hi): lo + (hi − lo)·sigmoid(raw).

    Open means open in float64 too: a saturated sigmoid (raw ≳ 37) rounds to exactly 1, and
    `hi` itself is often what the solver refuses (SOR's ω = 2), so decoded values are clamped to
    the neighbouring floats inside the bounds."""

    dim = 1
    expands = False

    def __init__(self, lo: float, hi: float) -> None:
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"Interval needs finite lo < hi, got ({lo}, {hi})")
        self.lo, self.hi = float(lo), float(hi)
        self.inside = (math.nextafter(self.lo, self.hi), math.nextafter(self.hi, self.lo))

    def decode_tensor(self, raw: torch.Tensor) -> torch.Tensor:
        return (self.lo + (self.hi - self.lo) * torch.sigmoid(raw[0])).clamp(*self.inside)

    def to_setting(self, value: torch.Tensor) -> float:
        return float(value)

    def encode(self, value: float) -> torch.Tensor:
        if not self.lo < value < self.hi:
            raise ValueError(f"{value} lies outside the open interval ({self.lo}, {self.hi})")
        return torch.tensor([_logit((value - self.lo) / (self.hi - self.lo))], dtype=torch.float64)

    def fraction(self, values: torch.Tensor) -> torch.Tensor:
        """Where `values` sit in the interval, 0 at lo and 1 at hi: (v − lo)/(hi − lo)."""
        return (values - self.lo) / (self.hi - self.lo)

    def encode_clipped(self, values: torch.Tensor) -> torch.Tensor:
        """Raw θ of setting values, elementwise, for values from a formula (an anchor) that may
        fall on or outside the bounds: θ = logit(clip(fraction(v), ε, 1 − ε)), ε = `ANCHOR_CLIP`,
        with fraction(v) = (v − lo)/(hi − lo) here and (ln v − ln lo)/(ln hi − ln lo) for a
        `LogInterval`. Inside (lo + ε(hi − lo), hi − ε(hi − lo)) decode inverts it to round-off."""
        return torch.logit(self.fraction(values.to(torch.float64)).clamp(ANCHOR_CLIP, 1.0 - ANCHOR_CLIP))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "interval", "lo": self.lo, "hi": self.hi}

    def __repr__(self) -> str:
        return f"Interval({self.lo}, {self.hi})"


class LogInterval(Interval):
    """A positive scalar in (lo, hi), uniform in log scale: for tolerances, thresholds, bounds."""

    def __init__(self, lo: float, hi: float) -> None:
        if not lo > 0:
            raise ValueError(f"LogInterval needs lo > 0, got {lo}")
        super().__init__(lo, hi)

    def decode_tensor(self, raw: torch.Tensor) -> torch.Tensor:
        log_lo, log_hi = math.log(self.lo), math.log(self.hi)
        return torch.exp(log_lo + (log_hi - log_lo) * torch.sigmoid(raw[0])).clamp(*self.inside)

    def encode(self, value: float) -> torch.Tensor:
        if not self.lo < value < self.hi:
            raise ValueError(f"{value} lies outside the open interval ({self.lo}, {self.hi})")
        fraction = (math.log(value) - math.log(self.lo)) / (math.log(self.hi) - math.log(self.lo))
        return torch.tensor([_logit(fraction)], dtype=torch.float64)

    def fraction(self, values: torch.Tensor) -> torch.Tensor:
        """Where `values` sit in log scale, 0 at lo and 1 at hi: (ln v − ln lo)/(ln hi − ln lo)
        (a non-positive value counts as below lo)."""
        log_lo, log_hi = math.log(self.lo), math.log(self.hi)
        return (torch.log(values.clamp(min=1e-300)) - log_lo) / (log_hi - log_lo)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "log_interval", "lo": self.lo, "hi": self.hi}

    def __repr__(self) -> str:
        return f"LogInterval({self.lo}, {self.hi})"


def sine_basis(n: int, modes: int) -> torch.Tensor:
    """[n, modes] discrete sine modes sin(jπ i/(n+1)): the eigenvectors of the 1-D Dirichlet Laplacian."""
    i = torch.arange(1, n + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, modes + 1, dtype=torch.float64)[None, :]
    return torch.sin(math.pi * i * j / (n + 1))


def _wavenumber_weights(axes: int, modes: int, decay: float) -> torch.Tensor:
    """(|κ|/|κ₁|)^(−decay) for the modes of a 1-D or 2-D (row-major, kron-ordered) sine basis."""
    k = torch.arange(1, modes + 1, dtype=torch.float64)
    squared = k**2 if axes == 1 else (k[:, None] ** 2 + k[None, :] ** 2).reshape(-1)
    return (squared / squared[0]) ** (-decay / 2)


class Vector:
    """A vector of length n (or a grid of shape (nx, ny), flattened row-major), e.g. an initial guess.

    With `basis="sine"` it is spanned by the lowest `modes` sine modes per axis: a forward
    gradient's variance grows with dimension, so a low-dimensional basis is the first variance cut.
    `decay = p` scales mode κ by (|κ|/|κ₁|)^(−p), so that θ's coordinates have comparable sizes
    when the vector's spectrum decays: p = 2 for solutions of a Laplacian-like operator, whose
    coefficients are the right-hand side's divided by eigenvalues ∝ |κ|². Without it, an optimizer
    that steps every coordinate alike (Adam) overshoots the small high-mode coefficients.
    """

    expands = False

    def __init__(self, n: int | tuple[int, int], basis: str = "sine", modes: int | None = None,
                 scale: float = 1.0, decay: float = 0.0) -> None:
        self.shape = (n,) if isinstance(n, int) else tuple(n)
        if len(self.shape) not in (1, 2) or min(self.shape) < 1:
            raise ValueError(f"Vector needs n >= 1 or a 2-D grid shape, got {n!r}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"Vector scale must be positive and finite, got {scale}")
        self.size = int(np.prod(self.shape))
        self.scale = float(scale)
        if not math.isfinite(decay):
            raise ValueError(f"Vector decay must be finite, got {decay}")
        if basis == "identity":
            if modes is not None or decay != 0.0:
                raise ValueError("Vector(basis='identity') takes no modes and no decay")
            self.basis = None
            self.dim = self.size
        elif basis == "sine":
            if modes is None or not 1 <= modes <= min(self.shape):
                raise ValueError(f"Vector(basis='sine') needs 1 <= modes <= {min(self.shape)}, got {modes}")
            factors = [sine_basis(n_axis, modes) for n_axis in self.shape]
            self.basis = factors[0] if len(factors) == 1 else torch.kron(factors[0], factors[1])
            self.basis = self.basis * _wavenumber_weights(len(self.shape), modes, decay)
            self.dim = self.basis.shape[1]
        else:
            raise ValueError(f"unknown Vector basis {basis!r}: use 'sine' or 'identity'")
        self.basis_name, self.modes, self.decay = basis, modes, float(decay)

    def decode_tensor(self, raw: torch.Tensor) -> torch.Tensor:
        coefficients = self.scale * raw
        return coefficients if self.basis is None else self.basis @ coefficients

    def to_setting(self, value: torch.Tensor) -> np.ndarray:
        return value.detach().numpy().astype(np.float64, copy=True)

    def encode(self, value: Any) -> torch.Tensor:
        """Least-squares coefficients of `value` (exact when it lies in the span)."""
        x = torch.as_tensor(np.asarray(value, dtype=np.float64)).reshape(-1)
        if x.shape[0] != self.size:
            raise ValueError(f"vector of length {x.shape[0]} given, this Vector has {self.size}")
        if self.basis is None:
            return x / self.scale
        return torch.linalg.lstsq(self.basis, x[:, None]).solution[:, 0] / self.scale

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "vector", "n": list(self.shape), "basis": self.basis_name, "modes": self.modes,
                "scale": self.scale, "decay": self.decay}

    def __repr__(self) -> str:
        n = self.shape[0] if len(self.shape) == 1 else self.shape
        return f"Vector({n}, basis={self.basis_name!r}, modes={self.modes}, scale={self.scale}, decay={self.decay})"


class Choice:
    """One of a few named solver configurations (or values of one option), as a categorical policy.

    θ holds one logit per choice; the policy is p = softmax(θ). Deployment takes the most probable
    choice, so `decode` is argmax. Training cannot difference through argmax, so estimators for
    discrete parts sample choices from p and use the score function ∇_θ log p(k) (see
    `metasolve.method.score_function`). Each choice is either a value of the option this part is named
    after (`Choice(["cg", "gmres"])` under the name "ksp_type") or a mapping of several options
    (`Choice([{"ksp_type": "cg", "pc_type": "gamg"}, ...])`), which the space merges into the
    setting: a choice decodes to PETSc options like every other part.
    """

    FORCE_MARGIN = 50.0

    def __init__(self, choices: Sequence[Any]) -> None:
        choices = list(choices)
        if len(choices) < 2:
            raise ValueError(f"Choice needs at least two choices, got {choices!r}")
        expands = [isinstance(c, Mapping) for c in choices]
        if any(expands) and not all(expands):
            raise ValueError("Choice takes either option values or option mappings, not a mix")
        if len({repr(c) for c in choices}) != len(choices):
            raise ValueError(f"Choice has repeated choices: {choices!r}")
        self.choices = [dict(c) for c in choices] if all(expands) else choices
        self.expands = all(expands)
        self.dim = self.n_values = len(choices)

    def decode_tensor(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def index(self, value: torch.Tensor) -> int:
        """The deployed choice: the most probable one (ties go to the first)."""
        return int(torch.argmax(value))

    def to_setting(self, value: torch.Tensor) -> Any:
        return self.choices[self.index(value)]

    def log_probs(self, raw: torch.Tensor) -> torch.Tensor:
        """log p(k | θ) for every choice k, [..., n_values], differentiable in θ."""
        return torch.log_softmax(raw, dim=-1)

    def force(self, k: int) -> torch.Tensor:
        """A raw θ whose decode is choice k (a query point for a sampled choice)."""
        raw = torch.full((self.dim,), -self.FORCE_MARGIN, dtype=torch.float64)
        raw[k] = 0.0
        return raw

    def encode(self, value: Any) -> torch.Tensor:
        matches = [k for k, c in enumerate(self.choices) if c == value]
        if not matches:
            raise ValueError(f"{value!r} is not one of the choices {self.choices!r}")
        return torch.zeros(self.dim, dtype=torch.float64).index_fill_(0, torch.tensor(matches[:1]), 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "choice", "choices": self.choices}

    def __repr__(self) -> str:
        return f"Choice({self.choices!r})"


class Integer:
    """An integer option in [lo, hi] (GMRES restart, ILU levels, ASM overlap), as an ordinal policy.

    One raw coordinate sets the policy's centre μ = lo − ½ + (hi − lo + 1)·sigmoid(θ), so every
    integer owns an equal stretch of θ's image and `round(μ)` is the deployed value. Training
    samples k from a discretised logistic around μ with spread s,
        p(k) = F(k + ½) − F(k − ½),  F(x) = sigmoid((x − μ)/s),
    with the tails folded into lo and hi, so neighbouring integers share probability: the score
    function ∇_θ log p(k) then tells the policy which way along the integers the cost falls,
    information a categorical over unrelated values would not share.
    """

    dim = 1
    expands = False

    def __init__(self, lo: int, hi: int, spread: float | None = None) -> None:
        if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer)) and lo < hi):
            raise ValueError(f"Integer needs integers lo < hi, got ({lo!r}, {hi!r})")
        self.lo, self.hi = int(lo), int(hi)
        self.n_values = self.hi - self.lo + 1
        self.spread = float(spread) if spread is not None else max(1.0, self.n_values / 8)
        if not (math.isfinite(self.spread) and self.spread > 0):
            raise ValueError(f"Integer spread must be positive and finite, got {spread!r}")

    def decode_tensor(self, raw: torch.Tensor) -> torch.Tensor:
        return self.lo - 0.5 + self.n_values * torch.sigmoid(raw[0])

    def index(self, value: torch.Tensor) -> int:
        return int(min(max(math.floor(float(value) + 0.5), self.lo), self.hi)) - self.lo

    def to_setting(self, value: torch.Tensor) -> int:
        return self.lo + self.index(value)

    def log_probs(self, raw: torch.Tensor) -> torch.Tensor:
        """log p(k | θ) for k = lo..hi, [..., n_values] for raw of shape [..., 1]."""
        centre = self.lo - 0.5 + self.n_values * torch.sigmoid(raw[..., :1])
        edges = torch.arange(self.lo, self.hi, dtype=torch.float64) + 0.5
        cdf = torch.sigmoid((edges - centre) / self.spread)
        mass = torch.diff(cdf, dim=-1, prepend=torch.zeros_like(centre), append=torch.ones_like(centre))
        return torch.log(mass.clamp(min=1e-300))

    def force(self, k: int) -> torch.Tensor:
        return torch.tensor([_logit((k + 0.5) / self.n_values)], dtype=torch.float64)

    def encode(self, value: int) -> torch.Tensor:
        if not (isinstance(value, (int, np.integer)) and self.lo <= value <= self.hi):
            raise ValueError(f"{value!r} is not an integer in [{self.lo}, {self.hi}]")
        return self.force(int(value) - self.lo)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "integer", "lo": self.lo, "hi": self.hi, "spread": self.spread}

    def __repr__(self) -> str:
        return f"Integer({self.lo}, {self.hi}, spread={self.spread})"


def is_discrete(part: Part) -> bool:
    """Parts decoded by argmax/rounding: estimators must sample them, not difference through them."""
    return isinstance(part, (Choice, Integer))


class Space:
    """Named parts composed into one raw vector θ; `decode` gives the oracle's setting."""

    def __init__(self, parts: Mapping[str, Part]) -> None:
        if not parts:
            raise ValueError("Space needs at least one part")
        self.parts = dict(parts)
        self.slices: dict[str, slice] = {}
        start = 0
        for name, part in self.parts.items():
            self.slices[name] = slice(start, start + part.dim)
            start += part.dim
        self.dim = start

    def check(self, theta: torch.Tensor) -> None:
        """Reject θ of the wrong width or with non-finite entries, naming the problem."""
        if theta.shape[-1] != self.dim:
            raise ValueError(f"θ has width {theta.shape[-1]}, the space {self!r} has dim {self.dim}")
        if not torch.all(torch.isfinite(theta)):
            raise ValueError("θ contains non-finite values (NaN or inf)")

    def decode_tensors(self, theta_row: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable decode, for torch-differentiable oracles (the twins)."""
        self.check(theta_row)
        return {name: part.decode_tensor(theta_row[self.slices[name]]) for name, part in self.parts.items()}

    def decode(self, theta_row: torch.Tensor) -> dict[str, Any]:
        with torch.no_grad():
            tensors = self.decode_tensors(torch.as_tensor(theta_row, dtype=torch.float64))
        setting: dict[str, Any] = {}
        for name, value in tensors.items():
            part = self.parts[name]
            decoded = part.to_setting(value)
            entries = decoded if part.expands else {name: decoded}
            clash = sorted(set(entries) & set(setting))
            if clash:
                raise ValueError(f"part {name!r} sets {clash}, already set by another part of the space")
            setting.update(entries)
        return setting

    def encode(self, setting: Mapping[str, Any]) -> torch.Tensor:
        """Raw θ for a decoded setting (a choice of option mappings is found by its options)."""
        rows = []
        for name, part in self.parts.items():
            if part.expands:
                keys = set().union(*part.choices)
                rows.append(part.encode({k: setting[k] for k in keys if k in setting}))
            elif name not in setting:
                raise ValueError(f"setting lacks {name!r} required by the space")
            else:
                rows.append(part.encode(setting[name]))
        return torch.cat(rows)

    def to_dict(self) -> dict[str, Any]:
        """The space as plain data (names, kinds, numbers), so a saved model loads without pickle."""
        return {"parts": [[name, part.to_dict()] for name, part in self.parts.items()]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Space":
        """Inverse of `to_dict`; an unknown part kind or a bad entry is a ValueError naming it."""
        builders = {
            "interval": lambda d: Interval(d["lo"], d["hi"]),
            "log_interval": lambda d: LogInterval(d["lo"], d["hi"]),
            "vector": lambda d: Vector(d["n"][0] if len(d["n"]) == 1 else tuple(d["n"]), basis=d["basis"],
                                       modes=d["modes"], scale=d["scale"], decay=d["decay"]),
            "choice": lambda d: Choice(d["choices"]),
            "integer": lambda d: Integer(d["lo"], d["hi"], spread=d["spread"]),
        }
        parts = {}
        for name, part in data["parts"]:
            if part.get("kind") not in builders:
                raise ValueError(f"space part {name!r} has unknown kind {part.get('kind')!r}")
            try:
                parts[name] = builders[part["kind"]](part)
            except (KeyError, TypeError) as error:
                raise ValueError(f"space part {name!r} ({part['kind']}) is malformed: {error!r}") from None
        return cls(parts)

    def discrete_parts(self) -> dict[str, Choice | Integer]:
        return {name: part for name, part in self.parts.items() if is_discrete(part)}

    def __repr__(self) -> str:
        return "Space({" + ", ".join(f"{k!r}: {v!r}" for k, v in self.parts.items()) + "})"
