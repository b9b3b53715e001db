"""Fixed-point solving with implicit gradients (METHODS.md section 2, attractor refinement). Pure tensor
ops on y [B, ...] (B = sequences); they know nothing of models.

    solve               Picard or Anderson forward solve, per-sequence stop/freeze/fallback  (solvers.py)
    AndersonHistory     batched Anderson mixing                                              (anderson.py)
    fixed_point_solve   y* = f(y*) with implicit-function-theorem gradients, O(1) memory     (implicit.py)
    jacobian_penalty    Hutchinson ||J^T v||^2 regulariser                                   (implicit.py)
    unrolled_picard     differentiable plain iteration, the gradient ground truth            (reference.py)
"""

from .anderson import AndersonHistory
from .config import BACKWARD_MODES, FixedPointConfig
from .implicit import FixedPointInfo, clip_adjoint, fixed_point_solve, jacobian_penalty
from .reference import unrolled_picard
from .solvers import SOLVERS, SolveInfo, relative_residual, solve

__all__ = [
    "BACKWARD_MODES",
    "SOLVERS",
    "AndersonHistory",
    "FixedPointConfig",
    "FixedPointInfo",
    "SolveInfo",
    "clip_adjoint",
    "fixed_point_solve",
    "jacobian_penalty",
    "relative_residual",
    "solve",
    "unrolled_picard",
]
