"""`microgpt-jax eval`: a run's loss, perplexity and bits per character."""

import json

PARSER = {
    "help": "a run's loss, perplexity and bits per character, on its validation split or on a file",
    "description": "Evaluate a run's checkpoint. On the validation split (the default) this is the training's own "
    "evaluation: the loss is the val_loss the training recorded at that step (on the same devices). "
    "loss is measured as the training measures it (docs: the mean over documents of their mean token loss; "
    "stream: the mean token loss); perplexity is exp(the mean loss per token) and bits per character "
    "the summed loss in bits over the characters the predicted tokens stand for (a document's end counting as one).",
}


def add_arguments(p):
    p.add_argument("run_dir", help="a run directory (its latest good checkpoint) or RUN_DIR@STEP")
    p.add_argument("--step", type=int, default=None, help="evaluate checkpoint N (default: the latest good one)")
    p.add_argument(
        "--data",
        default=None,
        metavar="FILE",
        help="evaluate on this text file instead, laid out in the run's data mode: every document (docs) or the whole "
        "text in windows of block_size + 1 tokens (stream) (default: the run's validation split)",
    )
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")


def run(args):
    from microgpt_jax.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, data=args.data, step=args.step)
    print(json.dumps(result.to_json()) if args.json else result.table())
