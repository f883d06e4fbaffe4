"""`microgpt-jax sample`: samples of a trained run (or an export), printed as each batch completes."""

import itertools
import json

from microgpt_jax.errors import positive_int, seed_int

PARSER = {
    "help": "sample from a trained run",
    "description": "Sample from a trained run. Samples are printed as each batch completes, one per line; when the "
    "run's vocabulary can produce a line break (a text run), each sample is instead preceded by a line "
    "`--- sample N (C characters) ---` and is exactly the C characters after it, then a newline. --json is "
    "one JSON object per line either way.",
}


def add_arguments(p):
    p.add_argument("run_dir", help="a run directory (its latest good checkpoint), RUN_DIR@STEP, or an exported .safetensors file")
    p.add_argument("--num-samples", type=positive_int, default=20, help="samples to draw (default %(default)s)")
    p.add_argument(
        "--temperature", type=float, default=0.5, help="softmax temperature; 0 (or below 1e-6) means greedy (default %(default)s)"
    )
    p.add_argument("--top-k", type=int, default=None, help="draw only from the K most likely tokens (default: all tokens)")
    p.add_argument("--top-p", type=float, default=None, help="draw only from the top tokens holding probability P (default: all tokens)")
    p.add_argument("--prompt", default="", help="every sample continues this text, e.g. ka (default: none, samples start fresh)")
    p.add_argument("--seed", type=seed_int, default=42, help="random seed of the draws (default %(default)s)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="samples generated (and printed) together (default: all, at most 1000; fewer for long samples, 16 past block_size)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="tokens to draw per sample, past block_size too: the context then slides, each token predicted from the last "
        "block_size tokens (default: until the sample fills block_size); a sample still ends at BOS",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per line: {"sample": text, prompt included, "logprob": its log-probability, '
        '"ids": its token ids} (default: plain text)',
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="draw from Python's random stream as microgpt does, exactly the scalar engine's samples (default: the compiled sampler)",
    )


def run(args):
    from microgpt_jax.rundir import load_weights
    from microgpt_jax.sample import breaks_lines, check_options, encode_prompt, frame, print_samples, sample_run

    options = dict(top_k=args.top_k, top_p=args.top_p, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    check_options(args.temperature, reference=args.reference, **options)  # before the weights are read
    weights = load_weights(args.run_dir)
    cfg, tokenizer, params = weights.cfg, weights.tokenizer, weights.params
    prompt = encode_prompt(tokenizer, args.prompt, cfg)
    drawn = dict(reference=args.reference, seed=args.seed, temperature=args.temperature, prompt=prompt, **options)
    mode = (weights.settings or {}).get("data", {}).get("mode", "docs")  # a run's or an export's: stream starts at a line
    batches = sample_run(params, cfg, args.num_samples, tokenizer=tokenizer, mode=mode, **drawn)
    framed = not args.json and breaks_lines(tokenizer)

    def render(number, s):
        text = tokenizer.decode([*prompt, *s.ids])  # decoded together: a character may span the prompt's last id and the next
        if args.json:
            return json.dumps({"sample": text, "logprob": s.logprob, "ids": [*prompt, *s.ids]})
        return frame(number, text) if framed else text

    numbers = itertools.count(1)
    print_samples(([render(next(numbers), s) for s in batch] for batch in batches), args.num_samples)
