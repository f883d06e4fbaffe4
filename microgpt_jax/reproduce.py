"""microgpt's exact experiment on the JAX engine (spec sections 1-5).

Same seed, same shuffle, the scalar engine's initial weights, batch 1 in
spec order, float64, then 20 samples drawn from the same Python `random`
stream. It prints what `python -m reference` prints, line for line.
"""

import jax
import jax.numpy as jnp

from microgpt_jax.data import DataConfig, DocumentSource, separated
from microgpt_jax.layout import Docs
from microgpt_jax.loop import run_steps
from microgpt_jax.memory import num_params
from microgpt_jax.model import GPTConfig, init_params_reference
from microgpt_jax.sample import sample_reference
from microgpt_jax.text import reference_docs
from microgpt_jax.tokenizer import CharTokenizer
from microgpt_jax.train import TrainConfig, Trainer

NUM_SAMPLES, TEMPERATURE = 20, 0.5


def reproduce(data_path, steps=1000, print=print):
    jax.config.update("jax_enable_x64", True)  # the scalar engine computes in Python floats
    docs, rng = reference_docs(data_path)
    tokenizer = CharTokenizer.from_docs(docs)
    print(f"num docs: {len(docs)}")
    print(f"vocab size: {tokenizer.size}")
    cfg = GPTConfig(vocab_size=tokenizer.size)
    params = jax.tree.map(jnp.asarray, init_params_reference(cfg, rng))
    print(f"num params: {num_params(cfg)}")

    tcfg = TrainConfig(steps=steps, dtype="float64")
    dcfg = DataConfig(layout="padded", val_fraction=0.0)
    trainer = Trainer(cfg, tcfg, packed=dcfg.packed)
    data = DocumentSource(Docs.separated(*separated(tokenizer, docs)), [], dcfg, 1, cfg.block_size)  # step s: docs[s % len(docs)]
    # one compiled call for the whole run: microgpt's 1000 steps are one loop on the device
    for chunk in run_steps(trainer, trainer.init(params), data, steps, length=steps):
        params = chunk.state.params
        for s, loss in enumerate(chunk.metrics["loss"], chunk.start):
            print(f"step {s + 1:4d} / {steps:4d} | loss {loss:.4f}")

    print("\n--- inference (new, hallucinated names) ---")
    for i, s in enumerate(sample_reference(params, cfg, rng, NUM_SAMPLES, TEMPERATURE)):
        print(f"sample {i + 1:2d}: {tokenizer.decode(s.ids)}")
