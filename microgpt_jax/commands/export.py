"""`microgpt-jax export`: a run's parameters as safetensors."""

PARSER = {"help": "write a run's parameters as safetensors, vocabulary in the metadata"}


def add_arguments(p):
    p.add_argument("run_dir", help="a run directory (its latest good checkpoint) or RUN_DIR@STEP")
    p.add_argument("out", metavar="OUT.safetensors", help="the .safetensors file to write (must not exist)")


def run(args):
    from microgpt_jax.rundir import export_safetensors

    step = export_safetensors(args.run_dir, args.out)
    print(f"wrote {args.out}: the parameters of step {step}, tokenizer and configs in its metadata")
