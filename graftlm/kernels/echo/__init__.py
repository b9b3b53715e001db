"""Echo recall state (METHODS.md section 3): ridge-regression recall from running statistics with a
spectrally normalised Koopman filter. Pure tensor ops; ``reference.py`` states the equations and the
causal semantics every path shares.

    echo_chunked    chunk-parallel forward for training and prefill          (chunked.py)
    echo_step       one decode token on a constant-size EchoState            (recurrent.py)
    echo_reference  brute-force ground truth                                 (reference.py)
"""

from .chunked import echo_chunked
from .recurrent import EchoState, echo_recurrent, echo_state_numel, echo_step, init_state
from .reference import echo_reference, readout_operator, scale_keys, whitened_operator

__all__ = [
    "EchoState", "echo_chunked", "echo_recurrent", "echo_reference", "echo_state_numel", "echo_step",
    "init_state", "readout_operator", "scale_keys", "whitened_operator",
]
