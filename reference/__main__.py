"""`python -m reference`: microgpt's whole run on the scalar engine (spec sections 1-5)."""

import random

from microgpt_jax.errors import ArgumentParser, positive_int, run_cli
from microgpt_jax.text import load_docs, resolve_data_path
from reference.gpt import Adam, Config, init_state, parameters, sample, train_step

SEED, NUM_SAMPLES = 42, 20


def main(argv=None):
    parser = ArgumentParser(prog="python -m reference", description=__doc__)
    parser.add_argument("--steps", type=positive_int, default=1000, help="training steps (default 1000)")
    parser.add_argument("--data", default=None, help="text file, one document per line (default: names)")
    args = parser.parse_args(argv)

    rng = random.Random(SEED)
    docs = load_docs(resolve_data_path(args.data))
    rng.shuffle(docs)
    uchars = sorted(set("".join(docs)))
    bos = len(uchars)
    print(f"num docs: {len(docs)}")
    print(f"vocab size: {len(uchars) + 1}")

    cfg = Config(vocab_size=len(uchars) + 1)
    state = init_state(cfg, rng)
    params = parameters(state)
    print(f"num params: {len(params)}")

    adam = Adam(params, args.steps)
    index = {ch: i for i, ch in enumerate(uchars)}
    for step in range(args.steps):
        tokens = [bos] + [index[ch] for ch in docs[step % len(docs)]] + [bos]
        step_loss = train_step(state, cfg, adam, step, tokens)
        print(f"step {step + 1:4d} / {args.steps:4d} | loss {step_loss:.4f}")

    print("\n--- inference (new, hallucinated names) ---")
    for i in range(NUM_SAMPLES):
        name = "".join(uchars[t] for t in sample(state, cfg, rng, bos))
        print(f"sample {i + 1:2d}: {name}")


if __name__ == "__main__":
    run_cli(main)
