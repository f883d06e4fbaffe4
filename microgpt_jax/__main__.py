from microgpt_jax.cli import entry

entry()
