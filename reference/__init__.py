"""The scalar reference engine: microgpt as plain Python, one `Value` per number.

It is the seed program bit for bit with every option at its default, and
carries every variant of the contract (norms, activations, rope, tied
embeddings, qk-norm, grouped-query attention, logit softcap, dropout masks,
and AdamW, clipping, warmup and schedules). It exists to check the JAX
package: same weights in, same gradients, Adam updates and samples out, to
float64 round-off. It imports nothing from microgpt_jax.
"""

from reference.engine import Value, topological_order

# One token's forward is reference.gpt.gpt: not re-exported, so that the name
# `reference.gpt` stays the module.
from reference.gpt import (
    ACTIVATIONS,
    NORMS,
    Adam,
    Config,
    backward_batch,
    check_config,
    dropout_masks,
    init_state,
    loss,
    param_shapes,
    parameters,
    sample,
    sequence_logits,
    softmax,
    train_batch,
    train_step,
)

__all__ = [
    "ACTIVATIONS",
    "Adam",
    "Config",
    "NORMS",
    "Value",
    "backward_batch",
    "check_config",
    "dropout_masks",
    "init_state",
    "loss",
    "param_shapes",
    "parameters",
    "sample",
    "sequence_logits",
    "softmax",
    "topological_order",
    "train_batch",
    "train_step",
]
