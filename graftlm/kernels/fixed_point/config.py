"""`FixedPointConfig`: solver settings for ``fixed_point_solve`` (forward solve, adjoint, regulariser).

Defaults are METHODS.md section 2's language-model setting (Anderson, m = 5, 6..32 iterations,
tol 1.5e-4). A graft's own config can hold one of these or copy the fields it exposes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .solvers import SOLVERS

BACKWARD_MODES = ("one_step", "picard", "anderson")


@dataclass
class FixedPointConfig:
    solver: str = field(
        default="anderson",
        metadata={"help": "Forward solver: 'anderson' (accelerated) or 'picard' (plain iteration)."},
    )
    m: int = field(default=5, metadata={"help": "Anderson memory: how many past iterates are mixed."})
    beta: float = field(
        default=1.0,
        metadata={"help": "Anderson mixing: 1 mixes map values f(y_i); < 1 damps toward the iterates."},
    )
    lam: float = field(
        default=1e-4,
        metadata={"help": "Ridge of the Anderson least squares, relative to the mean squared residual norm."},
    )
    tol: float = field(
        default=1.5e-4,
        metadata={
            "help": "Stop a sequence when ||f(y) - y|| / ||y|| < tol (and at least min_iter updates ran)."
        },
    )
    min_iter: int = field(default=6, metadata={"help": "Updates every sequence runs before it may stop."})
    max_iter: int = field(default=32, metadata={"help": "Most updates of the forward solve."})
    backward: str = field(
        default="anderson",
        metadata={
            "help": "Adjoint u = v + J^T u of the implicit gradient: 'one_step' (u ~ v + J^T v, one VJP), "
            "'picard' or 'anderson' (solved to adjoint_tol)."
        },
    )
    adjoint_max_iter: int = field(default=32, metadata={"help": "Most updates of the adjoint solve."})
    adjoint_tol: float = field(
        default=1e-5, metadata={"help": "Relative-residual tolerance of the adjoint solve."}
    )
    adjoint_clip: float | None = field(
        default=None,
        metadata={
            "help": "If set, rescale each sequence's adjoint so ||u|| <= adjoint_clip * ||v|| (v = incoming "
            "gradient). None disables it. For a map with contraction rho the exact ratio is at most 1/(1-rho)."
        },
    )
    jacobian_samples: int = field(
        default=0,
        metadata={
            "help": "Hutchinson samples of the Jacobian regulariser ||J^T v||^2 / N returned as "
            "info.jacobian_loss while training; 0 turns it off. Its weight (1e-3) is the caller's."
        },
    )
    check_every: int = field(
        default=4,
        metadata={
            "help": "Read 'have all sequences stopped?' (a host sync) only every check_every updates after "
            "min_iter; results are the same for any value, a few frozen evaluations may be added."
        },
    )

    per_position: bool = field(
        default=False,
        metadata={
            "help": "Judge convergence per position: y [B, T, ...] converges when every position's relative "
            "residual is below tol (the sequence's residual is its worst position's), not the flattened one."
        },
    )

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {self.backward!r}")
        if not 0 <= self.min_iter <= self.max_iter:
            raise ValueError(f"need 0 <= min_iter <= max_iter, got {self.min_iter}, {self.max_iter}")
        if self.m < 1 or self.adjoint_max_iter < 0 or self.jacobian_samples < 0 or self.check_every < 1:
            raise ValueError("m and check_every must be >= 1; adjoint_max_iter and jacobian_samples >= 0")
        if self.adjoint_clip is not None and self.adjoint_clip <= 0:
            raise ValueError(f"adjoint_clip must be positive or None, got {self.adjoint_clip}")
