"""microgpt-jax: a fast, exact JAX reimplementation of microgpt.

Modules: data (documents, vocabulary, batches), model (GPTConfig, params,
forward, loss), train (TrainConfig, optimizer, jitted steps), sample,
checkpoint (run directories), check (the cross-check against `reference`),
reproduce (microgpt's run), graph (a jitted step's program and donated
buffers, for the notebooks), cli (the `microgpt-jax` command).
"""

__version__ = "0.1.0"
