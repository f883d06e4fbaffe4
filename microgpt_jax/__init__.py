"""microgpt-jax: a fast, exact JAX reimplementation of microgpt.

Modules, in layers (each imports only its own layer or those below):
- errors, config (config fields), jsonfile, text (files, documents),
  tokenizer (char, byte, bpe), runtime (process-wide JAX settings);
- model (GPTConfig, params, forward, loss, KV cache), layout (batch
  layouts), dataset (prepared datasets read and checked), data (DataConfig,
  the split, batch sources), parallel (meshes, processes), memory, flops,
  metrics (metrics.jsonl), plot, graph (a jitted step's program and buffers),
  hf (Hugging Face GPT-2 and Llama checkpoints, both ways);
- train (TrainConfig, the optimizer, the jitted step and loop, Evaluator),
  sample, prepare (writes datasets);
- loop (fit, the chunk plan, the hooks), checkpoint, rundir (RunConfig,
  run directories, opening a run), loggers (TensorBoard, W&B);
- session (one training run put together), evaluate, check (the
  cross-check against `reference`), reproduce (microgpt's run), bench;
- commands (one module per command), cli (the `microgpt-jax` command).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("microgpt-jax")  # pyproject.toml's, written once
except PackageNotFoundError:  # a checkout on PYTHONPATH that was never installed
    __version__ = "unknown"
