"""The GPT of ../shared/spec/microgpt.md, vectorized over a whole sequence.

Parameters are a flat dict of arrays keyed like microgpt's (`wte`, `wpe`,
`lm_head`, `layer0.attn_wq`, ...), each `[out, in]`, so `x @ W.T` is the
microgpt's `linear(x, W)`. Every function is pure: weights in, arrays out.

Shape suffixes: B batch rows, T positions, D n_embd, H heads, K head size,
F 4*n_embd, V vocabulary, S key positions.

    x = rmsnorm(wte[tok] + wpe[pos])
    per layer:  x += attn(rmsnorm(x));  x += fc2(relu(fc1(rmsnorm(x))))
    logits = lm_head(x)

One `block` is the layer for both ways of running the model: `forward` (a
whole sequence, keys and values of the sequence itself) and `forward_cached`
(a few new positions whose keys and values go into a preallocated KVCache
that the queries attend over: microgpt's inference, one token at a time).
"""

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from microgpt_jax.config import ConfigError, field, positive, validate
from microgpt_jax.text import bos_id

INIT_STD = 0.08
NORM_EPS = 1e-5


@dataclass(frozen=True)
class GPTConfig:
    """The model's shape. Defaults are microgpt's (vocab_size comes from the data)."""

    vocab_size: int = field(27, "tokens in the vocabulary, set from the data", check=positive)
    n_embd: int = field(16, "embedding width", check=positive)
    n_head: int = field(4, "attention heads, a divisor of n_embd", check=positive)
    n_layer: int = field(1, "transformer layers", check=positive)
    block_size: int = field(16, "most positions the model sees at once", check=positive)

    def __post_init__(self):
        validate(self)
        if self.n_embd % self.n_head:
            raise ConfigError(
                "n_embd",
                f"({self.n_embd}) must be divisible by n_head ({self.n_head}); change one so that n_embd / n_head is a whole head size",
            )

    @property
    def bos(self) -> int:
        return bos_id(self.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def param_shapes(cfg: GPTConfig) -> dict[str, tuple[int, int]]:
    """Name -> [out, in] of every weight, in the spec's creation order."""
    d = cfg.n_embd
    shapes = {"wte": (cfg.vocab_size, d), "wpe": (cfg.block_size, d), "lm_head": (cfg.vocab_size, d)}
    for i in range(cfg.n_layer):
        shapes |= {
            f"layer{i}.attn_wq": (d, d),
            f"layer{i}.attn_wk": (d, d),
            f"layer{i}.attn_wv": (d, d),
            f"layer{i}.attn_wo": (d, d),
            f"layer{i}.mlp_fc1": (4 * d, d),
            f"layer{i}.mlp_fc2": (d, 4 * d),
        }
    return shapes


def init_params(cfg: GPTConfig, key, dtype=jnp.float32) -> dict:
    """Every weight ~ N(0, 0.08^2), drawn with jax.random."""
    shapes = param_shapes(cfg)
    keys = jax.random.split(key, len(shapes))
    return {name: INIT_STD * jax.random.normal(k, shape, dtype) for k, (name, shape) in zip(keys, shapes.items())}


def init_params_reference(cfg: GPTConfig, rng, dtype=np.float64) -> dict:
    """The scalar engine's initialisation: rng.gauss(0, 0.08) in the spec's order.

    Given the same `random.Random` state, this gives the very weights the
    scalar engine starts from, and leaves rng where the scalar engine would.
    """
    return {
        name: np.array([[rng.gauss(0, INIT_STD) for _ in range(n_in)] for _ in range(n_out)], dtype)
        for name, (n_out, n_in) in param_shapes(cfg).items()
    }


def rmsnorm(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + NORM_EPS)


QUERY_BLOCK = 64  # queries per attention block: a block needs the keys up to its own end only


@jax.custom_jvp
def softmax(z):
    """Softmax over the last axis as microgpt computes it: exp(z - max) * (1 / sum), the max a constant."""
    e = jnp.exp(z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True)))
    return e * (1 / jnp.sum(e, axis=-1, keepdims=True))


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    # y * (dz - <y, dz>): two passes over the scores, not one per op of the forward
    (z,), (dz,) = primals, tangents
    y = softmax(z)
    return y, y * (dz - jnp.sum(y * dz, axis=-1, keepdims=True))


def split_heads(x_BTD, n_head):
    """[B, T, D] -> [B, H, T, K]: heads lead, so both attention products are plain batched matmuls."""
    B, T, D = x_BTD.shape
    return x_BTD.reshape(B, T, n_head, D // n_head).transpose(0, 2, 1, 3)


def attend(q_BHTK, k_BHSK, v_BHSK, mask_BTS, query_block=None):
    """Softmax attention of T queries over S keys; mask_BTS[b, t, s] says whether t may see s.

    With query_block (queries and keys are the same causal sequence), the
    queries go in blocks, each against the keys up to its own end only: the
    scores the causal mask would zero anyway are never computed (a quarter
    of them at T = 128).
    """
    T, S, K = q_BHTK.shape[2], k_BHSK.shape[2], q_BHTK.shape[3]
    scale = np.asarray(1 / np.sqrt(K), q_BHTK.dtype)  # microgpt's "/ sqrt(head_dim)" is a multiply by its inverse
    step = query_block or T
    out_BHTK = []
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        s1 = t1 if query_block else S
        att_BHTS = jnp.einsum("bhtk,bhsk->bhts", q_BHTK[:, :, t0:t1], k_BHSK[:, :, :s1]) * scale
        att_BHTS = softmax(jnp.where(mask_BTS[:, None, t0:t1, :s1], att_BHTS, -jnp.inf))
        out_BHTK.append(jnp.einsum("bhts,bhsk->bhtk", att_BHTS, v_BHSK[:, :, :s1]))
    return jnp.concatenate(out_BHTK, axis=2)


ATTENTIONS = ("einsum", "xla", "cudnn")  # attend above; jax.nn.dot_product_attention's XLA or cuDNN implementation


def attention_implementation(backend, dtype, cfg: GPTConfig) -> str:
    """Which attention a compiled forward uses: "cudnn" or "einsum" (`attend`).

    cuDNN's fused attention for bfloat16/float16 on a GPU where it takes the
    shape (head size a multiple of 8, at most 128; an even block_size, as its
    backward with a mask needs); everywhere else, float64 and the
    cross-checks included, `attend`, exact against the scalar engine. "xla"
    (jax.nn.dot_product_attention's XLA implementation) is chosen only by name.
    """
    fused = backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    fits = cfg.head_dim % 8 == 0 and cfg.head_dim <= 128 and cfg.block_size % 2 == 0
    return "cudnn" if fused and fits else "einsum"


def attend_fused(q_BHTK, k_BHSK, v_BHSK, mask_BTS, implementation):
    """`attend` as jax.nn.dot_product_attention computes it (implementation "xla" or "cudnn"), causal.

    The causal part goes as is_causal (cuDNN then skips the blocks above the
    diagonal); the packed rows' same-document part as a boolean mask, which
    cuDNN takes as an additive bias [B, 1, T, T] (it has no segment-id
    mask in this API; its packed THD layout is not public).
    """
    to_BTHK = lambda a: a.transpose(0, 2, 1, 3)  # the API's layout: [batch, positions, heads, head size]
    out_BTHK = jax.nn.dot_product_attention(
        to_BTHK(q_BHTK), to_BTHK(k_BHSK), to_BTHK(v_BHSK), mask=mask_BTS[:, None], is_causal=True, implementation=implementation
    )
    return to_BTHK(out_BTHK)


def mlp(x_BTD, fc1, fc2):
    return jax.nn.relu(x_BTD @ fc1.T) @ fc2.T


def attention_mask(positions_BT, segments_BT):
    """Causal within a document: t sees s iff s <= t and both belong to the same document.

    Positions restart at 0 for every document, so within one document the
    order of positions is the order of the sequence.
    """
    T = positions_BT.shape[-1]
    causal_TS = jnp.tril(jnp.ones((T, T), bool))
    same_doc_BTS = segments_BT[:, :, None] == segments_BT[:, None, :]
    return causal_TS[None] & same_doc_BTS


class KVCache(NamedTuple):
    """Every layer's keys and values at every position decoded so far.

    k[layer] and v[layer] are [batch, heads, block_size, head size] (heads
    lead, as in attention), allocated once; a position's entry means something once it is written.
    The layer axis is a tuple, not an array axis: inside the generation loop
    XLA updates separate buffers in place but copies a stacked
    [layer, ...] array on every step (5-8x slower decode steps, measured).
    """

    k: tuple
    v: tuple

    def write(self, layer, start, k_BHTK, v_BHTK):
        """The cache with positions start..start+T-1 of `layer` set."""
        k = jax.lax.dynamic_update_slice_in_dim(self.k[layer], k_BHTK, start, axis=2)
        v = jax.lax.dynamic_update_slice_in_dim(self.v[layer], v_BHTK, start, axis=2)
        return KVCache(_replace(self.k, layer, k), _replace(self.v, layer, v))


def _replace(items, i, item):
    return items[:i] + (item,) + items[i + 1 :]


def init_cache(cfg: GPTConfig, batch_size, dtype=jnp.float32) -> KVCache:
    shape = (batch_size, cfg.n_head, cfg.block_size, cfg.head_dim)
    empty = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layer))  # own buffers: they are donated
    return KVCache(empty(), empty())


def embed(params, tokens_BT, positions_BT):
    return rmsnorm(params["wte"][tokens_BT] + params["wpe"][positions_BT])


def block(params, i, x_BTD, mask_BTS, n_head, cache=None, start=0, attention="einsum"):
    """Layer i: x += attn(rmsnorm(x)); x += mlp(rmsnorm(x)). Returns (x, cache).

    Without a cache the T queries attend over the T keys of x itself
    (mask_BTS is [B, T, T]). With one, the T new keys and values are first
    written into layer i of the cache at positions start..start+T-1 and the
    queries attend over all block_size cached positions (mask_BTS is
    [B, T, block_size]): microgpt's "append k and v, then attend over the cache".
    attention (ATTENTIONS) applies to the first way only: the cache's way is always `attend`.
    """
    p = f"layer{i}."
    D = x_BTD.shape[-1]
    h_BTD = rmsnorm(x_BTD)
    q_BHTK, k_BHSK, v_BHSK = (split_heads(h_BTD @ params[p + w].T, n_head) for w in ("attn_wq", "attn_wk", "attn_wv"))
    if cache is None and attention != "einsum":
        out_BHTK = attend_fused(q_BHTK, k_BHSK, v_BHSK, mask_BTS, attention)
    elif cache is None:
        out_BHTK = attend(q_BHTK, k_BHSK, v_BHSK, mask_BTS, QUERY_BLOCK)
    else:
        cache = cache.write(i, start, k_BHSK, v_BHSK)
        out_BHTK = attend(q_BHTK, cache.k[i], cache.v[i], mask_BTS)
    # concatenating the heads and applying wo, as one contraction over (head, k)
    x_BTD = x_BTD + jnp.einsum("bhtk,dhk->btd", out_BHTK, params[p + "attn_wo"].reshape(D, n_head, D // n_head))
    x_BTD = x_BTD + mlp(rmsnorm(x_BTD), params[p + "mlp_fc1"], params[p + "mlp_fc2"])
    return x_BTD, cache


def forward(params, tokens_BT, cfg: GPTConfig, positions_BT=None, segments_BT=None, attention="einsum"):
    """Logits [B, T, V] for every position of every row, all at once.

    Without positions and segments each row is one document starting at
    position 0, and this equals running microgpt's token-by-token model over
    the row with its KV cache. attention: one of ATTENTIONS (static).
    """
    B, T = tokens_BT.shape
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    if segments_BT is None:
        segments_BT = jnp.zeros((B, T), jnp.int32)
    mask_BTS = attention_mask(positions_BT, segments_BT)

    x_BTD = embed(params, tokens_BT, positions_BT)
    for i in range(cfg.n_layer):
        x_BTD, _ = block(params, i, x_BTD, mask_BTS, cfg.n_head, attention=attention)
    return x_BTD @ params["lm_head"].T


def forward_cached(params, tokens_BT, cache: KVCache, start, cfg: GPTConfig):
    """(logits [B, T, V], cache) for tokens at positions start..start+T-1 of every row.

    The rows continue what the cache holds at positions < start; the tokens'
    keys and values are written into the cache. The caller keeps
    start + T <= block_size (beyond it JAX would clamp, not fail).
    """
    B, T = tokens_BT.shape
    positions_T = start + jnp.arange(T)
    # causal by position: a cached slot s is seen iff it has been written, s <= t
    mask_1TS = (jnp.arange(cfg.block_size)[None, :] <= positions_T[:, None])[None]
    x_BTD = embed(params, tokens_BT, jnp.broadcast_to(positions_T, (B, T)))
    for i in range(cfg.n_layer):
        x_BTD, cache = block(params, i, x_BTD, mask_1TS, cfg.n_head, cache, start)
    return x_BTD @ params["lm_head"].T, cache


@partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def decode_step(params, token_B, cache: KVCache, pos, cfg: GPTConfig):
    """One token per row at position pos: (next-token logits [B, V], cache with its keys and values)."""
    logits_B1V, cache = forward_cached(params, token_B[:, None], cache, pos, cfg)
    return logits_B1V[:, 0], cache


def loss_fn(params, batch, cfg: GPTConfig, attention="einsum"):
    """sum(weights * -log p(target)): per document the mean over its positions, then the mean over documents."""
    logits_BTV = forward(params, batch.tokens, cfg, batch.positions, batch.segments, attention)
    # bfloat16 compute: the softmax and the loss still in float32
    logits_BTV = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    # the target's log-probability picked by a one-hot mask: one fused multiply-sum, no gather and scatter
    target_BTV = batch.targets[..., None] == jnp.arange(logp_BTV.shape[-1])
    nll_BT = -jnp.sum(jnp.where(target_BTV, logp_BTV, 0), axis=-1)
    return jnp.sum(batch.weights.astype(nll_BT.dtype) * nll_BT)
