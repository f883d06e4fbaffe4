"""microgpt-jax: a fast, exact JAX reimplementation of microgpt.

Modules: data (documents, vocabulary, batches), model (GPTConfig, params,
forward, loss), train (TrainConfig, optimizer, jitted steps), sample,
checkpoint (run directories), check (the cross-check against `reference`),
reproduce (microgpt's run), graph (a jitted step's program and donated
buffers, for the notebooks), cli (the `microgpt-jax` command).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("microgpt-jax")  # pyproject.toml's, written once
except PackageNotFoundError:  # a checkout on PYTHONPATH that was never installed
    __version__ = "unknown"
