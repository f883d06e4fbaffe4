"""Run by tests/test_parallel.py in a fresh process (the device count is fixed at JAX start-up).

Trains the same 10 steps on a 1-device mesh and on an N-device mesh, and
prints the largest differences as JSON.
"""

import json
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from microgpt_jax import parallel  # noqa: E402
from microgpt_jax.layout import Batch  # noqa: E402
from microgpt_jax.model import GPTConfig, init_params  # noqa: E402
from microgpt_jax.tokenizer import CharTokenizer  # noqa: E402
from microgpt_jax.train import SweepTrainer, TrainConfig, Trainer  # noqa: E402
from tests.helpers import reference_batches  # noqa: E402

DOCS = ["emma", "olivia", "ava", "isabella", "sophia", "mia", "charlotte", "amelia", "harper", "evelyn", "abigail"]


def train(num_devices, steps=10, batch_size=8):
    tokenizer = CharTokenizer.from_docs(DOCS)
    cfg = GPTConfig(vocab_size=tokenizer.size, n_embd=8, n_head=2, n_layer=1, block_size=8)
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, dtype="float64")
    mesh = parallel.make_mesh(num_devices)
    trainer = Trainer(cfg, tcfg, mesh)
    state = trainer.init(trainer.replicate(init_params(cfg, jax.random.key(0), jnp.float64)))
    batches = trainer.put(reference_batches([tokenizer.encode(d) for d in DOCS], 0, steps, batch_size, cfg.block_size))
    state, metrics = trainer.steps(state, batches, steps)
    losses = metrics["loss"]
    assert int(state.step) == steps
    shards = {len(x.sharding.device_set) for x in jax.tree.leaves(batches)}
    return np.asarray(losses), jax.tree.map(np.asarray, state.params), shards


def sweep(num_devices, members, steps=10, batch_size=8):
    """Members with lr 0.01, 0.02, ... on the batches of `train`: member 0 is train's run."""
    tokenizer = CharTokenizer.from_docs(DOCS)
    cfg = GPTConfig(vocab_size=tokenizer.size, n_embd=8, n_head=2, n_layer=1, block_size=8)
    tcfgs = [TrainConfig(steps=steps, batch_size=batch_size, dtype="float64", lr=0.01 * (i + 1)) for i in range(members)]
    trainer = SweepTrainer(cfg, tcfgs, [0.0] * members, parallel.make_mesh(num_devices))
    params = jax.tree.map(lambda a: np.stack([a] * members), init_params(cfg, jax.random.key(0), jnp.float64))
    state = trainer.init(params)
    one = reference_batches([tokenizer.encode(d) for d in DOCS], 0, steps, batch_size, cfg.block_size)
    batches = trainer.put(Batch(*(np.stack([a] * members, axis=1) for a in one)))
    state, metrics = trainer.steps(state, batches, steps)
    shards = {len(x.sharding.device_set) for x in jax.tree.leaves(state.params)}
    return np.asarray(metrics["loss"])[:, 0], jax.tree.map(lambda a: np.asarray(a)[0], state.params), shards, trainer.by_member


if __name__ == "__main__":
    n = int(sys.argv[1])
    assert jax.device_count() == n, jax.devices()
    one_losses, one_params, _ = train(1)
    many_losses, many_params, shards = train(n)
    rel = lambda a, b: float(np.max(np.abs(a - b) - 1e-10 * np.abs(b)))  # noqa: E731
    swept = {}
    for members in (n, n - 1):  # members spread over the devices; each member's rows split over them
        losses, params, used, by_member = sweep(n, members)
        excess = max(rel(losses, one_losses), *(rel(params[k], one_params[k]) for k in one_params))
        swept[f"sweep_{members}"] = {"excess": excess, "by_member": by_member, "devices_used": sorted(used)}
    print(
        json.dumps(
            {
                "devices_used": sorted(shards),
                "loss_excess": rel(many_losses, one_losses),
                "param_excess": max(rel(many_params[k], one_params[k]) for k in one_params),
                "losses_differ_somewhere": bool(np.any(many_losses != one_losses)),
                "losses": many_losses.tolist(),
                **swept,
            }
        )
    )
