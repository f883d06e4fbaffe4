"""`microgpt-jax export`: a run's parameters as safetensors, or as a Hugging Face checkpoint directory."""

PARSER = {"help": "write a run's parameters as safetensors (vocabulary in the metadata) or as a Hugging Face checkpoint (--format hf)"}


def add_arguments(p):
    p.add_argument("run_dir", help="a run directory (its latest good checkpoint) or RUN_DIR@STEP")
    p.add_argument("out", metavar="OUT", help="the OUT.safetensors file, or with --format hf the directory, to write (must not exist)")
    p.add_argument(
        "--format",
        choices=("safetensors", "hf"),
        default="safetensors",
        help="safetensors: our keys, configs and tokenizer in the metadata; hf: config.json, model.safetensors and (bpe) tokenizer "
        "files of a GPT2LMHeadModel (learned positions) or LlamaForCausalLM (rope), as transformers loads them (default %(default)s)",
    )


def run(args):
    from microgpt_jax.rundir import export_hf, export_safetensors

    if args.format == "hf":
        arch, step = export_hf(args.run_dir, args.out)
        return print(f"wrote {args.out}: the parameters of step {step} as a Hugging Face {arch}")
    step = export_safetensors(args.run_dir, args.out)
    print(f"wrote {args.out}: the parameters of step {step}, tokenizer and configs in its metadata")
