"""The scalar reference engine: microgpt as plain Python, one `Value` per number.

It exists to check the JAX package: same weights in, same gradients, Adam
updates and samples out, to float64 round-off.
"""

from reference.engine import Value, topological_order

# One token's forward is reference.gpt.gpt: not re-exported, so that the name
# `reference.gpt` stays the module.
from reference.gpt import (
    Adam,
    Config,
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
