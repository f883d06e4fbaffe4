"""The scalar reference engine: microgpt as plain Python, one `Value` per number.

It exists to check the JAX package: same weights in, same gradients, Adam
updates and samples out, to float64 round-off.
"""

from reference.engine import Value, topological_order
from reference.gpt import (
    Adam,
    Config,
    gpt,
    init_state,
    loss,
    param_shapes,
    parameters,
    sample,
    sequence_logits,
    softmax,
    train_step,
)

__all__ = [
    "Adam",
    "Config",
    "Value",
    "gpt",
    "init_state",
    "loss",
    "param_shapes",
    "parameters",
    "sample",
    "sequence_logits",
    "softmax",
    "topological_order",
    "train_step",
]
