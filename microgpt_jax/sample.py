"""Sampling from a trained model: microgpt's inference, compiled.

There is one generation loop, `_generate`: prefill the prompt into a KV cache,
then one `decode_step` per position inside a `lax.while_loop`, for a batch of
rows that each stop at BOS on their own. By default a row also stops when it
fills block_size; asked for more tokens (max_new_tokens), it goes on with a
sliding window: once the cache is full, each token is predicted by a fresh
forward over the last block_size tokens at positions 0..block_size-1, exactly
as if the cropped context were the whole input (a second `lax.while_loop`;
learned positions make the cache useless once the window moves). Two ways of
drawing a token plug into it:

- `sample`: uniforms from jax.random, with temperature (0 = greedy), top-k and top-p.
  Row i of the whole run draws with its own key fold_in(key, i), so the
  samples do not depend on the batch size they were generated in.
- `sample_reference`: microgpt's `random.choices(range(vocab_size),
  weights=probs)` on the caller's Python `random` stream (spec section 5),
  one sample after another. The uniforms `random.choices` would consume are
  drawn up front and the stream is then advanced by exactly the number of
  draws used, so the same weights and the same stream give microgpt's very
  samples.

Each sample comes with its log-probability under the model itself
(temperature 1, nothing filtered): the sum over its drawn tokens, the ending
BOS included, of log softmax(logits)[token], given the prompt.
"""

import math
import random
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from microgpt_jax import memory
from microgpt_jax.config import ConfigError
from microgpt_jax.errors import UserError
from microgpt_jax.flops import compiler_options, flops_per_token, jitted
from microgpt_jax.model import GPTConfig, decode_step, forward, forward_cached, init_cache, softmax
from microgpt_jax.runtime import set_precision

GREEDY_BELOW = 1e-6  # a lower temperature is greedy: logits / T would overflow to inf, and the draw fall back to BOS
MAX_TOKENS = 2**31 - 1  # a batch's token positions are int32


class Sample(NamedTuple):
    ids: list  # the drawn token ids after the prompt, BOS excluded
    logprob: float


def check_options(temperature, top_k=None, top_p=None, *, reference=False, batch_size=None, max_new_tokens=None):
    """A UserError naming the bad option, if any: microgpt's sampling (reference) has no top-k, top-p, batch size or length."""
    given = {"--top-k": top_k, "--top-p": top_p, "--batch-size": batch_size, "--max-new-tokens": max_new_tokens}
    extra = [flag for flag, value in given.items() if value is not None]
    if reference and extra:
        raise UserError(
            f"{', '.join(extra)} cannot be used with --reference "
            "(microgpt draws one sample at a time from the whole softmax, until the block is full); drop them"
        )
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError("temperature", f"must be a number >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError("top_k", f"must be at least 1 (the number of most likely tokens kept), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError("top_p", f"must be in (0, 1] (the probability mass kept), got {top_p}")


def encode_prompt(tokenizer, text, cfg: GPTConfig) -> list[int]:
    """The prompt's token ids (BOS not included), or a UserError if the model cannot continue it."""
    unknown = tokenizer.unknown(text)
    if unknown:
        raise ConfigError("prompt", f"has characters outside the run's vocabulary {unknown}; the vocabulary is {tokenizer.chars!r}")
    ids = [int(i) for i in tokenizer.ids(text)]
    if len(ids) >= cfg.block_size:
        raise ConfigError(
            "prompt",
            f"is {len(ids)} tokens but the model's block_size is {cfg.block_size}; use a prompt of at most {cfg.block_size - 1} tokens",
        )
    return ids


# --- drawing a token ---


def running_sums(x_BV):
    """Running sums along the last axis, as one small matmul (XLA's CPU cumsum is a slow windowed reduction)."""
    V = x_BV.shape[-1]
    return x_BV @ jnp.triu(jnp.ones((V, V), x_BV.dtype))


def kept_mask(z_BV, top_k, top_p):
    """Which tokens top-k and then top-p keep, row by row.

    Tokens are ranked by z, highest first (ties: lower id first). Top-k keeps
    ranks < top_k. Top-p then keeps, of those, the shortest run of ranks
    whose probability (softmax over the top-k) reaches top_p: a rank is kept
    if the ranks before it hold less than top_p. Rank 0 is always kept.
    """
    V = z_BV.shape[-1]
    order_BV = jnp.argsort(-z_BV, axis=-1, stable=True)
    in_top_k_V = jnp.arange(V) < top_k
    probs_BV = jax.nn.softmax(jnp.where(in_top_k_V, jnp.take_along_axis(z_BV, order_BV, -1), -jnp.inf), axis=-1)
    before_BV = running_sums(probs_BV) - probs_BV  # exactly 0 at rank 0
    keep_by_rank_BV = in_top_k_V & ((before_BV < top_p) | (top_p >= 1))
    return jnp.take_along_axis(keep_by_rank_BV, jnp.argsort(order_BV, axis=-1), -1)


def draw_tokens(u_B, logits_BV, temperature, top_k, top_p):
    """One token per row: argmax if temperature is 0, else drawn from softmax(logits / T) over the kept set.

    Drawn by inverse CDF from one uniform u in [0, 1) per row, as
    random.choices draws: the first kept token whose running sum of
    probabilities exceeds u * total. temperature, top_k (vocab_size = keep
    all) and top_p (1 = keep all) are traced: changing them does not recompile.
    """
    V = logits_BV.shape[-1]
    id_V = jnp.arange(V)

    def drawn():
        z_BV = logits_BV / temperature.astype(logits_BV.dtype)
        # the sort is only paid for when something is filtered
        filtered = (top_k < V) | (top_p < 1)
        kept_BV = jax.lax.cond(filtered, kept_mask, lambda z, k, p: jnp.ones(z.shape, bool), z_BV, top_k, top_p)
        e_BV = jnp.where(kept_BV, jnp.exp(z_BV - jnp.max(z_BV, axis=-1, keepdims=True)), 0)
        cum_BV = running_sums(e_BV)
        past_BV = kept_BV & (cum_BV > u_B[:, None] * cum_BV[:, -1:])
        # first such token, by max-reductions; if rounding leaves none, the last kept token
        first_B = V - jnp.max(jnp.where(past_BV, V - id_V, 0), axis=-1)
        return jnp.where(first_B < V, first_B, jnp.max(jnp.where(kept_BV, id_V, -1), axis=-1))

    greedy = lambda: jnp.argmax(logits_BV, axis=-1)
    return jax.lax.cond(temperature >= GREEDY_BELOW, drawn, greedy).astype(jnp.int32)


def _cumsum_in_order(p_V):
    """Left-to-right running sum, as itertools.accumulate adds (so rounding matches)."""
    return jax.lax.scan(lambda acc, p: (acc + p, acc + p), jnp.zeros((), p_V.dtype), p_V)[1]


def choices_index(probs_V, u):
    """The index `random.choices(range(V), weights=probs)` picks when its random() returns u."""
    cum_V = _cumsum_in_order(probs_V)
    # bisect_right(cum, u * total, 0, V - 1): how many running sums are <= u * total
    return jnp.minimum(jnp.sum(cum_V <= u * cum_V[-1]), probs_V.shape[0] - 1)


def reference_probs(logits_V, temperature):
    """softmax(logits / T) in the scalar engine's order (model.softmax: exp(z - max) * (1 / sum))."""
    return softmax(logits_V / temperature)


# --- the generation loop ---


def _generate(params, prompt_P, cfg: GPTConfig, batch_size, draw, new_tokens=None):
    """Every row continues prompt_P ([BOS] + prompt ids) until it draws BOS or has drawn new_tokens.

    new_tokens (static) defaults to block_size - P + 1: the row stops when
    it fills the block. Past the block the context is the last block_size
    tokens, recomputed from scratch for every token. draw(logits_BV, step)
    gives each row's step-th drawn token. Returns the drawn tokens
    [B, new_tokens] (BOS after a row's end), each row's log-probability [B]
    and the number of loop steps (draws) taken.
    """
    P, T, bos = prompt_P.shape[0], cfg.block_size, cfg.bos
    N = new_tokens or T - P + 1
    seq_BL = jnp.full((batch_size, P + N), bos, jnp.int32).at[:, :P].set(prompt_P)
    cache = init_cache(cfg, batch_size, params["wte"].dtype)
    if P > 1:  # all but the last prompt token in one pass; the loop feeds the last one
        _, cache = forward_cached(params, seq_BL[:, : P - 1], cache, 0, cfg)

    def advance(pos, logits_BV, seq_BL, done_B, logp_B):
        """Draw the token after position pos: the sequence, the rows done and their log-probabilities, updated."""
        step = pos - (P - 1)
        new_B = jnp.where(done_B, bos, draw(logits_BV, step).astype(jnp.int32))
        new_logp_B = jnp.take_along_axis(logits_BV, new_B[:, None], -1)[:, 0] - jax.nn.logsumexp(logits_BV, axis=-1)
        logp_B = logp_B + jnp.where(done_B, 0, new_logp_B)
        return pos + 1, seq_BL.at[:, pos + 1].set(new_B), done_B | (new_B == bos), logp_B

    def cached(carry):
        pos, seq_BL, cache, done_B, logp_B = carry
        logits_BV, cache = decode_step(params, seq_BL[:, pos], cache, pos, cfg)
        pos, seq_BL, done_B, logp_B = advance(pos, logits_BV, seq_BL, done_B, logp_B)
        return pos, seq_BL, cache, done_B, logp_B

    def sliding(carry):
        pos, seq_BL, done_B, logp_B = carry
        window_BT = jax.lax.dynamic_slice_in_dim(seq_BL, pos - (T - 1), T, axis=1)
        return advance(pos, forward(params, window_BT, cfg)[:, -1], seq_BL, done_B, logp_B)

    def until(last):  # both carries are (pos, ..., done_B, logp_B)
        return lambda carry: (carry[0] < last) & ~jnp.all(carry[-2])

    init = (jnp.int32(P - 1), seq_BL, cache, jnp.zeros(batch_size, bool), jnp.zeros(batch_size, params["wte"].dtype))
    pos, seq_BL, _, done_B, logp_B = jax.lax.while_loop(until(min(T, P - 1 + N)), cached, init)
    if N > T - P + 1:  # static: only a run asked for more than the block compiles the sliding loop
        pos, seq_BL, done_B, logp_B = jax.lax.while_loop(until(P - 1 + N), sliding, (pos, seq_BL, done_B, logp_B))
    return seq_BL[:, P:], logp_B, pos - (P - 1)


def start_token(tokenizer, mode) -> int:
    """The token a sample starts from: BOS, as in training, except in stream mode, whose training never
    sees BOS: there a line break (when the tokenizer has it as one token), the start of a line of the text."""
    ids = [] if mode != "stream" or tokenizer.unknown("\n") else tokenizer.ids("\n")
    return int(ids[0]) if len(ids) == 1 else tokenizer.bos


def _with_start(cfg: GPTConfig, prompt, start=None):
    """The prompt after its start token at position 0: BOS unless another is given (start_token)."""
    return jnp.asarray([cfg.bos if start is None else start, *prompt], jnp.int32)


def _cut(out_NW, logp_N, bos) -> list[Sample]:
    rows, logps = np.asarray(out_NW).tolist(), np.asarray(logp_N).tolist()
    return [Sample(row[: row.index(bos)] if bos in row else row, lp) for row, lp in zip(rows, logps)]


def keyed_draw(key, rows_B, temperature, top_k, top_p):
    """draw(logits_BV, step) for the rows rows_B of a run.

    Row i's step-th uniform comes from fold_in(fold_in(key, i), step).
    """
    keys_B = jax.vmap(jax.random.fold_in, (None, 0))(key, rows_B)

    def draw(logits_BV, step):
        u_B = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step), dtype=logits_BV.dtype))(keys_B)
        return draw_tokens(u_B, logits_BV, temperature, top_k, top_p)

    return draw


def _sample_rows(params, prompt_P, key, rows_B, temperature, top_k, top_p, cfg: GPTConfig, new_tokens=None):
    draw = keyed_draw(key, rows_B, temperature, top_k, top_p)
    out_BN, logp_B, _ = _generate(params, prompt_P, cfg, rows_B.shape[0], draw, new_tokens)
    return out_BN, logp_B


def sample_rows(params, prompt_P, key, rows_B, temperature, top_k, top_p, cfg: GPTConfig, new_tokens=None):
    """Rows rows_B of a run, generated together: (tokens [B, new_tokens], log-probabilities [B]), by sampler(cfg)."""
    return sampler(cfg)(params, prompt_P, key, rows_B, temperature, top_k, top_p, cfg=cfg, new_tokens=new_tokens)


TOKENS_PER_BATCH = 16384  # the default batch: about this many drawn tokens (names: 1000 rows of 16)


def model_options(cfg: GPTConfig) -> tuple:
    """The XLA options (flops.compiler_options, as items) of cfg's samplers: by the model alone, so that a sample
    is the same whatever the batch and the count. A model whose default batch (TOKENS_PER_BATCH tokens' forward) is
    small compiles cheaply on a CPU: microgpt's sampler in 0.68 s instead of 1.16, 7% slower at batch 1000 (bench sampling)."""
    return compiler_options(jax.default_backend(), TOKENS_PER_BATCH * flops_per_token(cfg) / 3)  # forward only


def compiled_sampler(options: tuple = ()):
    """_sample_rows jitted with these XLA options (model_options): one jax.jit for each."""
    return jitted(_sample_rows, options, static_argnames=("cfg", "new_tokens"))


def sampler(cfg: GPTConfig):
    """The jitted sample_rows for cfg's model (it compiles once per batch shape)."""
    return compiled_sampler(model_options(cfg))


def default_batch_size(num_samples, new_tokens, fits) -> int:
    """Rows generated together by default: up to 1000, fewer for long samples, as each batch is printed when it completes.

    Past the block (fits False) every token costs a forward over block_size
    tokens: 16 rows, the fewest a batch holds by default.
    """
    return min(num_samples, 1000, max(16, TOKENS_PER_BATCH // new_tokens) if fits else 16)


def sample_batches(
    params,
    cfg: GPTConfig,
    num_samples,
    *,
    prompt=(),
    temperature=1.0,
    top_k=None,
    top_p=None,
    seed=0,
    batch_size=None,
    max_new_tokens=None,
    start=None,
):
    """num_samples samples continuing the prompt ids: an iterator of one list per batch, each as soon as it is drawn.

    start: the token before the prompt, at position 0 (default BOS; see start_token).
    batch_size defaults to default_batch_size. Every batch has the same
    shape (the last one runs padded), so this compiles once per
    (batch_size, max_new_tokens); the next batch is dispatched before the
    current one is read back. max_new_tokens: draws per sample (default:
    until the block is full, block_size - len(prompt)); past the block the
    context slides.
    """
    check_options(temperature, top_k, top_p)
    new_tokens = max_new_tokens or cfg.block_size - len(prompt)
    batch_size = min(
        batch_size or default_batch_size(num_samples, new_tokens, fits=len(prompt) + new_tokens <= cfg.block_size), num_samples
    )
    check_sample_fits(cfg, batch_size, len(prompt) + 1 + new_tokens, np.dtype(np.asarray(params["wte"]).dtype).itemsize)
    params = jax.tree.map(jnp.asarray, params)
    dtype, V = params["wte"].dtype, cfg.vocab_size
    prompt_P, key = _with_start(cfg, prompt, start), jax.random.key(seed)
    knobs = (
        jnp.asarray(temperature, dtype),
        jnp.int32(min(top_k or V, V)),
        jnp.asarray(1.0 if top_p is None else top_p, dtype),
    )

    def rows(first):
        rows_B = jnp.arange(first, first + batch_size)
        return sample_rows(params, prompt_P, key, rows_B, *knobs, cfg=cfg, new_tokens=new_tokens)

    def batches():  # (the options above are checked when sample_batches is called, not when first iterated)
        pending = rows(0)
        for first in range(0, num_samples, batch_size):
            out_BN, logp_B = pending
            if first + batch_size < num_samples:
                pending = rows(first + batch_size)  # computes while this batch is read back and printed
            while not out_BN.is_ready():  # waited for here, not inside the compiled call: ctrl-C stops a long batch
                time.sleep(0.01)
            yield _cut(out_BN, logp_B, cfg.bos)[: num_samples - first]

    return batches()


def check_sample_fits(cfg: GPTConfig, rows, length, itemsize, available=None):
    """A batch of rows samples of length tokens must be countable in int32 and fit in memory: else one line, before any
    allocation (a native abort otherwise)."""
    if length > MAX_TOKENS:
        raise ConfigError("max_new_tokens", f"gives samples of {length:,} tokens; the most is {MAX_TOKENS:,} (int32 positions)")
    per_row = 4 * length + itemsize * (2 * cfg.n_layer * cfg.block_size * cfg.kv_heads * cfg.head_dim + 4 * cfg.vocab_size)
    per_row += itemsize * cfg.block_size * (8 * cfg.n_embd + cfg.n_head * cfg.block_size)  # a sliding step's forward
    available = memory.available_bytes() if available is None else available
    if available is not None and rows * per_row > available:
        raise UserError(
            f"{rows:,} samples of {length:,} tokens at once need about {memory.format_bytes(rows * per_row)} but "
            f"{memory.format_bytes(available)} is available; lower --batch-size (or --max-new-tokens)",
        )


def sample_run(params, cfg: GPTConfig, num_samples, *, tokenizer, seed, temperature, mode="docs", reference=False, prompt=(), **options):
    """The batches `microgpt-jax sample` prints (options: sample_batches').

    reference: one batch, microgpt's draws from random.Random(seed), in
    float64; else sample_batches from the start token of the run's data
    mode (start_token; an export's: BOS). float64 weights sample in float64.
    """
    if reference or any(np.asarray(w).dtype == np.float64 for w in params.values()):
        set_precision("float64")  # microgpt's Python floats, or the run's own float64
    if reference:
        return [sample_reference(params, cfg, random.Random(seed), num_samples, temperature, prompt)]
    start = start_token(tokenizer, mode)
    return sample_batches(params, cfg, num_samples, prompt=prompt, temperature=temperature, seed=seed, start=start, **options)


def sample(params, cfg: GPTConfig, num_samples, **options) -> list[Sample]:
    """All num_samples samples of sample_batches (same options), in order."""
    return [s for batch in sample_batches(params, cfg, num_samples, **options) for s in batch]


def _sample_reference(params, prompt_P, uniforms, temperature, cfg: GPTConfig, num_samples):
    """Samples one after another through the generation loop (batch 1), each draw taking the next uniform."""
    W = cfg.block_size - prompt_P.shape[0] + 1  # until the block is full, as microgpt stops

    def one(i, carry):
        used, out_NW, logp_N = carry

        def draw(logits_1V, step):
            return choices_index(reference_probs(logits_1V[0], temperature), uniforms[used + step])[None]

        out_1W, logp_1, n = _generate(params, prompt_P, cfg, 1, draw)
        return used + n, out_NW.at[i].set(out_1W[0]), logp_N.at[i].set(logp_1[0])

    init = (jnp.int32(0), jnp.zeros((num_samples, W), jnp.int32), jnp.zeros(num_samples, params["wte"].dtype))
    return jax.lax.fori_loop(0, num_samples, one, init)


def sample_reference(params, cfg: GPTConfig, rng, num_samples=20, temperature=0.5, prompt=()) -> list[Sample]:
    """num_samples samples drawn as microgpt draws them from rng, a `random.Random` left where microgpt leaves it."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"microgpt's sampling (--reference) divides by the temperature: use one > 0, got {temperature}")
    if not jax.config.jax_enable_x64:
        raise RuntimeError("sample_reference draws exactly as microgpt's Python floats do: enable jax_enable_x64 first")
    params = jax.tree.map(lambda w: jnp.asarray(w, jnp.float64), params)
    W = cfg.block_size - len(prompt)
    state = rng.getstate()
    uniforms = np.array([rng.random() for _ in range(num_samples * W)])
    used, out_NW, logp_N = jitted(_sample_reference, model_options(cfg), static_argnames=("cfg", "num_samples"))(
        params, _with_start(cfg, prompt), uniforms, jnp.asarray(temperature, params["wte"].dtype), cfg, num_samples
    )
    rng.setstate(state)
    for _ in range(int(used)):  # leave rng exactly where microgpt's draws would
        rng.random()
    return _cut(out_NW, logp_N, cfg.vocab_size - 1)


# --- printing ---


def breaks_lines(tokenizer) -> bool:
    """Whether a sample can hold a line break (a token decodes to one): then printed samples need framing."""
    return any(len(("." + tokenizer.decode([i]) + ".").splitlines()) > 1 for i in range(tokenizer.size))


def frame(number, text) -> str:
    """A sample under a header that says its length: unambiguous whatever the text holds, newlines included."""
    return f"--- sample {number} ({len(text)} characters) ---\n{text}"


def print_samples(batches, total, file=None, bar=None):
    """Print batches of rendered samples, each as soon as it completes (flushed), with a progress bar on a terminal.

    batches: an iterator of lists of strings, one per sample. The bar goes to
    stderr when it is a terminal and the samples take more than one batch
    (or as bar says); each batch is then written through it, so the two do not mix.
    """
    file, progress = file or sys.stdout, None
    try:
        for i, texts in enumerate(batches):
            if i == 0 and (bar if bar is not None else sys.stderr.isatty() and len(texts) < total):
                from tqdm import tqdm

                progress = tqdm(total=total, unit="sample", file=sys.stderr, dynamic_ncols=True)
            if progress is None:
                print(*texts, sep="\n", file=file)
            else:
                progress.write("\n".join(texts), file=file)
                progress.update(len(texts))
            file.flush()
    finally:
        if progress is not None:
            progress.close()
