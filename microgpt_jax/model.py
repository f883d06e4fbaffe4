"""The GPT of ../shared/spec/microgpt.md, vectorized over a whole sequence.

Parameters are a flat dict of arrays keyed like microgpt's (`wte`, `wpe`,
`lm_head`, `layer0.attn_wq`, ...), each `[out, in]`, so `x @ W.T` is the
microgpt's `linear(x, W)`. Every function is pure: weights in, arrays out.

Shape suffixes: B batch rows, T positions, D n_embd, H heads, K head size,
F the MLP's hidden width (4*n_embd by default), V vocabulary, S key
positions, G key/value heads, R query heads per key/value head (H / G).

    x = rmsnorm(wte[tok] + wpe[pos])
    per layer:  x += attn(rmsnorm(x));  x += fc2(relu(fc1(rmsnorm(x))))
    logits = lm_head(x)

with microgpt's choices as the defaults of GPTConfig's variants: the norm
and the activation (by name, from NORMS and ACTIVATIONS), rotary positions
instead of wpe, lm_head tied to wte, qk-norm, grouped-query attention
(G = n_kv_head key/value heads), soft-capped logits and dropout (training
only; the masks are an argument, drawn by `dropout_masks`); and the pieces
of GPT-2's and Llama's blocks: learnable norm gains (and layernorm biases),
the norm after the embedding or not, a final norm before the head, biases
in the blocks' linear layers, a gated MLP of its own width, rope's base and
the norms' epsilon. Gains and biases are vectors [n]: `{site}_gain`,
`{site}_bias` for the norms (sites: embed_norm, layer{i}.attn_norm,
layer{i}.mlp_norm, final_norm), `{linear}_bias` for a layer's linear maps.

One `block` is the layer for both ways of running the model: `forward` (a
whole sequence, keys and values of the sequence itself) and `forward_cached`
(a few new positions whose keys and values go into a preallocated KVCache
that the queries attend over: microgpt's inference, one token at a time).
"""

import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from microgpt_jax.config import ConfigError, field, fraction, non_negative, positive, validate
from microgpt_jax.tokenizer import bos_id

# The parts of a step by name (jax.named_scope on the functions below, "optimizer" in train._step): XLA keeps
# them in each op's metadata, forward and backward, so a profile reads as the model does (bench large --breakdown).
PARTS = ("embed", "norm", "attn_proj", "attn_core", "mlp", "head", "loss", "optimizer")
part = jax.named_scope

INIT_STD = 0.08
NORM_EPS = 1e-5
ROPE_BASE = 10000.0


def rmsnorm(x, eps=NORM_EPS):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def layernorm(x, eps=NORM_EPS):
    """(x - mean) / sqrt(var + eps), before any gain and bias."""
    c = x - jnp.mean(x, axis=-1, keepdims=True)
    return c * jax.lax.rsqrt(jnp.mean(c * c, axis=-1, keepdims=True) + eps)


# by name (GPTConfig.norm and .activation): a new one is one entry here, and its name a valid choice
NORMS = {"rmsnorm": rmsnorm, "layernorm": layernorm}
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": partial(jax.nn.gelu, approximate=True),  # the tanh form: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
    "gelu_exact": partial(jax.nn.gelu, approximate=False),  # 0.5 x (1 + erf(x / sqrt(2)))
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "silu": jax.nn.silu,  # x sigmoid(x); with mlp "gated" the MLP is SwiGLU
}
POSITIONS = ("learned", "rope")  # a wpe table added to wte, or rotary embeddings of each head's q and k
MLPS = ("plain", "gated")  # fc2(act(fc1 x)), or fc2(act(gate x) * fc1 x) (GLU; SwiGLU with silu)
NORM_SITES = ("attn_norm", "mlp_norm")  # per layer, before each part; embed_norm and final_norm outside the layers


@dataclass(frozen=True)
class GPTConfig:
    """The model's shape. Defaults are microgpt's (vocab_size comes from the data)."""

    vocab_size: int = field(27, "tokens in the vocabulary, set from the data", check=positive)
    n_embd: int = field(16, "embedding width", check=positive)
    n_head: int = field(4, "attention heads, a divisor of n_embd", check=positive)
    n_layer: int = field(1, "transformer layers", check=positive)
    block_size: int = field(16, "most positions the model sees at once", check=positive)
    norm: str = field("rmsnorm", "the norm after the embedding and before attention and the MLP", choices=NORMS, since="0.2")
    activation: str = field("relu", "the MLP's activation", choices=ACTIVATIONS, since="0.2")
    pos: str = field("learned", "positions: a learned wpe table, or rotary embeddings of q and k (rope)", choices=POSITIONS, since="0.2")
    tie_embeddings: bool = field(False, "logits from wte, with no lm_head weight", since="0.2")
    qk_norm: bool = field(False, "rmsnorm each head's queries and keys before the dot product", since="0.2")
    n_kv_head: int = field(
        0, "key/value heads, a divisor of n_head (grouped-query attention); 0 means n_head", check=non_negative, since="0.2"
    )
    logit_softcap: float = field(0.0, "C > 0 caps the logits at C * tanh(logits / C); 0 means off", check=non_negative, since="0.2")
    dropout: float = field(
        0.0, "dropout of the attention weights and of both residual branches, in training only", check=fraction, since="0.2"
    )
    norm_gain: bool = field(False, "learnable gains on every norm (init 1), and biases (init 0) on layernorms", since="0.3")
    embed_norm: bool = field(True, "a norm right after the embedding (microgpt's; GPT-2 and Llama have none)", since="0.3")
    final_norm: bool = field(False, "a norm before the output layer (GPT-2's and Llama's)", since="0.3")
    bias: bool = field(False, "biases (init 0) in every linear layer of the blocks (attention and MLP; not lm_head)", since="0.3")
    mlp: str = field("plain", "the MLP: fc2(act(fc1 x)), or gated fc2(act(gate x) * fc1 x) (SwiGLU with silu)", choices=MLPS, since="0.3")
    mlp_hidden: int = field(0, "the MLP's hidden width; 0 means 4 * n_embd", check=non_negative, since="0.3")
    rope_theta: float = field(ROPE_BASE, "rope's base: angle p * rope_theta ** (-2 i / head size)", check=positive, since="0.3")
    norm_eps: float = field(NORM_EPS, "the epsilon of every norm, inside the square root", check=positive, since="0.3")

    def __post_init__(self):
        validate(self)
        if self.n_embd % self.n_head:
            raise ConfigError(
                "n_embd",
                f"({self.n_embd}) must be divisible by n_head ({self.n_head}); change one so that n_embd / n_head is a whole head size",
            )
        if self.n_head % self.kv_heads:
            raise ConfigError(
                "n_kv_head", f"({self.n_kv_head}) must divide n_head ({self.n_head}); use a divisor of it, or 0 for one per query head"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(
                "pos",
                f"rope needs an even head size, got n_embd / n_head = {self.head_dim}; change n_embd or n_head, or use learned positions",
            )

    @property
    def bos(self) -> int:
        return bos_id(self.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or one per query head."""
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        """The MLP's hidden width F: mlp_hidden, or 4 * n_embd."""
        return self.mlp_hidden or 4 * self.n_embd

    def norm_sites(self) -> list[str]:
        """Where the model's norms stand, by the prefix of their weights (layer{i}.attn_norm, ...)."""
        layers = [f"layer{i}.{site}" for i in range(self.n_layer) for site in NORM_SITES]
        return ["embed_norm"] * self.embed_norm + layers + ["final_norm"] * self.final_norm


def matrix_shapes(cfg: GPTConfig) -> dict[str, tuple[int, int]]:
    """Name -> [out, in] of every weight matrix, in the spec's creation order (no wpe with rope, no lm_head when tied)."""
    d, kv, f = cfg.n_embd, cfg.kv_heads * cfg.head_dim, cfg.hidden
    shapes = {"wte": (cfg.vocab_size, d)}
    if cfg.pos == "learned":
        shapes["wpe"] = (cfg.block_size, d)
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layer):
        p = f"layer{i}."
        shapes |= {p + "attn_wq": (d, d), p + "attn_wk": (kv, d), p + "attn_wv": (kv, d), p + "attn_wo": (d, d)}
        shapes |= {p + "mlp_gate": (f, d)} if cfg.mlp == "gated" else {}
        shapes |= {p + "mlp_fc1": (f, d), p + "mlp_fc2": (d, f)}
    return shapes


def vector_shapes(cfg: GPTConfig) -> dict[str, tuple[int]]:
    """Name -> [n] of every gain (`{norm}_gain`, init 1) and bias (`{norm}_bias`, `{linear}_bias`, init 0).

    Norm gains with norm_gain (and biases for layernorm), at each of
    cfg.norm_sites(); a bias per linear layer of the blocks with bias.
    """
    shapes = {}
    if cfg.norm_gain:
        for site in cfg.norm_sites():
            shapes[site + "_gain"] = (cfg.n_embd,)
            shapes |= {site + "_bias": (cfg.n_embd,)} if cfg.norm == "layernorm" else {}
    if cfg.bias:
        shapes |= {name + "_bias": (n_out,) for name, (n_out, _) in matrix_shapes(cfg).items() if name.startswith("layer")}
    return shapes


def param_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter: the matrices [out, in] in creation order, then the gains and biases [n]."""
    return matrix_shapes(cfg) | vector_shapes(cfg)


def initial_vector(name, shape, dtype):
    """A gain starts at 1, a bias at 0: the norm and the linear layer as they are without them."""
    return (np.ones if name.endswith("_gain") else np.zeros)(shape, dtype)


def init_params(cfg: GPTConfig, key, dtype=jnp.float32) -> dict:
    """Every weight matrix ~ N(0, 0.08^2), drawn with jax.random; gains 1, biases 0."""
    shapes = matrix_shapes(cfg)
    keys = jax.random.split(key, len(shapes))
    params = {name: INIT_STD * jax.random.normal(k, shape, dtype) for k, (name, shape) in zip(keys, shapes.items())}
    return params | {name: jnp.asarray(initial_vector(name, shape, dtype)) for name, shape in vector_shapes(cfg).items()}


def init_params_reference(cfg: GPTConfig, rng, dtype=np.float64) -> dict:
    """The scalar engine's initialisation: rng.gauss(0, 0.08) in the spec's order, gains 1 and biases 0 (no draws).

    Given the same `random.Random` state, this gives the very weights the
    scalar engine starts from, and leaves rng where the scalar engine would.
    """
    params = {
        name: np.array([[rng.gauss(0, INIT_STD) for _ in range(n_in)] for _ in range(n_out)], dtype)
        for name, (n_out, n_in) in matrix_shapes(cfg).items()
    }
    return params | {name: initial_vector(name, shape, dtype) for name, shape in vector_shapes(cfg).items()}


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
    """[B, T, n_head * K] -> [B, n_head, T, K]: heads lead, so both attention products are plain batched matmuls."""
    B, T, D = x_BTD.shape
    return x_BTD.reshape(B, T, n_head, D // n_head).transpose(0, 2, 1, 3)


def rope_table(positions_BT, head_dim, dtype, base=ROPE_BASE):
    """(cos, sin) [B, 1, T, K / 2] of the rotary angles p * base ** (-2 i / K): constants, no gradient."""
    theta = np.array([base ** (-2 * i / head_dim) for i in range(head_dim // 2)])  # as the scalar engine's floats
    wide = jnp.promote_types(dtype, jnp.float32)  # bfloat16 angles would lose whole radians at position 256
    angle_BTI = positions_BT[..., None].astype(wide) * theta.astype(wide)
    return jnp.cos(angle_BTI)[:, None].astype(dtype), jnp.sin(angle_BTI)[:, None].astype(dtype)


def rotate(x_BHTK, rope):
    """Each head's (x[i], x[i + K/2]) turned by its angle: x[i] c - x[i + K/2] s, x[i] s + x[i + K/2] c."""
    c, s = rope
    x1, x2 = jnp.split(x_BHTK, 2, axis=-1)
    return jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


# Attention's weighted sum, with its gradients as plain products. Autodiff would contract v's gradient over the
# weights' second-to-last axis (the queries), which XLA's CPU backend runs as a general dot several times slower
# than its fast library, which takes only the x @ y and x @ y^T forms; so the weights are transposed first, in
# memory (the barrier keeps XLA from folding the transpose back into the dot). bench packing: +11% packed,
# +4% padded tokens/s at microgpt's size; the large shape within noise (-4% to 0%).
@jax.custom_vjp
def weighted(w, v):
    """w @ v over the last two axes, the others batch axes (v's may broadcast: a key head shared by R query heads)."""
    return w @ v


def _weighted_fwd(w, v):
    return w @ v, (w, v)


def _weighted_bwd(res, g):
    w, v = res
    w_T = jax.lax.optimization_barrier(jnp.swapaxes(w, -1, -2))
    dv = w_T @ g
    summed = tuple(i for i, n in enumerate(v.shape) if n == 1 and dv.shape[i] != 1)  # the R axis a shared head spans
    return g @ jnp.swapaxes(v, -1, -2), jnp.sum(dv, axis=summed, keepdims=True)


weighted.defvjp(_weighted_fwd, _weighted_bwd)


@part("attn_core")
def attend(q_BHTK, k_BGSK, v_BGSK, mask_BTS, query_block=None, drop_BHTS=None):
    """Softmax attention of T queries over S keys; mask_BTS[b, t, s] says whether t may see s.

    Query head h reads key/value head h // R, R = H / G: the queries go as
    [B, G, R, T, K] against the [B, G, S, K] keys, which are never repeated.
    drop_BHTS (dropout) multiplies the attention weights after the softmax.
    With query_block (queries and keys are the same causal sequence), the
    queries go in blocks, each against the keys up to its own end only: the
    scores the causal mask would zero anyway are never computed (a quarter
    of them at T = 128).
    """
    B, H, T, K = q_BHTK.shape
    G, S = k_BGSK.shape[1], k_BGSK.shape[2]
    # the R axis only where heads share keys: XLA's CPU dots run 4-D products faster (bench large: 4% of a step)
    q_BGRTK = q_BHTK.reshape(B, G, H // G, T, K) if G < H else q_BHTK
    k_BGRSK, v_BGRSK = (k_BGSK[:, :, None], v_BGSK[:, :, None]) if G < H else (k_BGSK, v_BGSK)
    mask_BGRTS = mask_BTS[:, None, None] if G < H else mask_BTS[:, None]
    drop_BGRTS = None if drop_BHTS is None else drop_BHTS.reshape(q_BGRTK.shape[:-1] + (-1,))
    scale = np.asarray(1 / np.sqrt(K), q_BHTK.dtype)  # microgpt's "/ sqrt(head_dim)" is a multiply by its inverse
    step = query_block or T
    out_BGRTK = []
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        s1 = t1 if query_block else S
        att_BGRTS = q_BGRTK[..., t0:t1, :] @ jnp.swapaxes(k_BGRSK[..., :s1, :], -1, -2) * scale
        att_BGRTS = softmax(jnp.where(mask_BGRTS[..., t0:t1, :s1], att_BGRTS, -jnp.inf))
        if drop_BGRTS is not None:
            att_BGRTS = att_BGRTS * drop_BGRTS[..., t0:t1, :s1]
        out_BGRTK.append(weighted(att_BGRTS, v_BGRSK[..., :s1, :]))
    return jnp.concatenate(out_BGRTK, axis=-2).reshape(B, H, T, K)


ATTENTIONS = ("einsum", "xla", "cudnn")  # attend above; jax.nn.dot_product_attention's XLA or cuDNN implementation


def attention_implementation(backend, dtype, cfg: GPTConfig) -> str:
    """Which attention a compiled forward uses: "cudnn" or "einsum" (`attend`).

    cuDNN's fused attention for bfloat16/float16 on a GPU where it takes the
    shape (head size a multiple of 8, at most 128; an even block_size, as its
    backward with a mask needs) and the model has no dropout (the fused
    kernels take no mask on the attention weights); everywhere else, float64
    and the cross-checks included, `attend`, exact against the scalar engine.
    "xla" (jax.nn.dot_product_attention's XLA implementation) is chosen only by name.
    """
    fused = backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    fits = cfg.head_dim % 8 == 0 and cfg.head_dim <= 128 and cfg.block_size % 2 == 0
    return "cudnn" if fused and fits and not cfg.dropout else "einsum"


@part("attn_core")
def attend_fused(q_BHTK, k_BGSK, v_BGSK, mask_BTS, implementation):
    """`attend` as jax.nn.dot_product_attention computes it (implementation "xla" or "cudnn"), causal.

    The causal part goes as is_causal (cuDNN then skips the blocks above the
    diagonal); the packed rows' same-document part as a boolean mask, which
    cuDNN takes as an additive bias [B, 1, T, T] (it has no segment-id
    mask in this API; its packed THD layout is not public). It takes G < H
    key/value heads as they are, query head h reading key head h // (H / G) as `attend` does.
    """
    to_BTHK = lambda a: a.transpose(0, 2, 1, 3)  # the API's layout: [batch, positions, heads, head size]
    out_BTHK = jax.nn.dot_product_attention(
        to_BTHK(q_BHTK), to_BTHK(k_BGSK), to_BTHK(v_BGSK), mask=mask_BTS[:, None], is_causal=True, implementation=implementation
    )
    return to_BTHK(out_BTHK)


def linear(params, name, x):
    """x @ W.T, plus the layer's bias where the model has one (`{name}_bias`)."""
    y = x @ params[name].T
    return y if name + "_bias" not in params else y + params[name + "_bias"]


@part("mlp")
def mlp(params, p, x_BTD, cfg: GPTConfig):
    """fc2(act(fc1 x)), or with mlp "gated" fc2(act(gate x) * fc1 x): [B, T, F] in between."""
    act = ACTIVATIONS[cfg.activation]
    h_BTF = linear(params, p + "mlp_fc1", x_BTD)
    h_BTF = act(linear(params, p + "mlp_gate", x_BTD)) * h_BTF if cfg.mlp == "gated" else act(h_BTF)
    return linear(params, p + "mlp_fc2", h_BTF)


@part("norm")
def normed(params, site, x_BTD, cfg: GPTConfig):
    """The norm at site (GPTConfig.norm_sites), times its gain and plus its bias where the model has them."""
    y_BTD = NORMS[cfg.norm](x_BTD, cfg.norm_eps)
    if site + "_gain" in params:
        y_BTD = y_BTD * params[site + "_gain"]
    return y_BTD if site + "_bias" not in params else y_BTD + params[site + "_bias"]


@part("attn_core")
def attention_mask(positions_BT, segments_BT=None):
    """Causal within a document: t sees s iff s <= t and both belong to the same document.

    Positions restart at 0 for every document, so within one document the
    order of positions is the order of the sequence. Without segments each
    row is one document (and padding after it, which no position before it
    sees): the causal mask alone, [1, T, T], a constant XLA folds into the
    scores' select (measured: 5-10% of the large shape's step, bench large).
    """
    T = positions_BT.shape[-1]
    causal_1TS = jnp.tril(jnp.ones((T, T), bool))[None]
    return causal_1TS if segments_BT is None else causal_1TS & (segments_BT[:, :, None] == segments_BT[:, None, :])


# -- dropout ----------------------------------------------------------------------------------

DROPOUT_SITES = ("attn", "attn_out", "mlp_out")  # per layer: the attention weights, the attention and MLP branches


def dropout_keep(key, cfg: GPTConfig, rows_B, T, keep_prob=None) -> dict | None:
    """Which entries dropout keeps (True, with probability 1 - dropout) at every site of rows rows_B, by name; None without dropout.

    `layer{i}.attn` is [B, H, T, T] (the attention weights), `layer{i}.attn_out`
    and `layer{i}.mlp_out` [B, T, D] (the branches before the residual add).
    Row r's masks are one draw from fold_in(key, r), cut into the sites in
    that order: a micro-batch draws exactly its rows' share of the whole
    batch's masks, and only that. keep_prob: 1 - dropout as an array (a
    sweep member's), in place of cfg's.
    """
    if not cfg.dropout:
        return None
    shapes = {"attn": (cfg.n_head, T, T), "attn_out": (T, cfg.n_embd), "mlp_out": (T, cfg.n_embd)}
    sites = {f"layer{i}.{site}": shapes[site] for i in range(cfg.n_layer) for site in DROPOUT_SITES}
    sizes = [math.prod(shape) for shape in sites.values()]

    def row(r):
        p = 1 - cfg.dropout if keep_prob is None else keep_prob
        keep = jax.random.bernoulli(jax.random.fold_in(key, r), p, (sum(sizes),))  # one draw: one RNG to compile
        parts = jnp.split(keep, np.cumsum(sizes)[:-1])
        return {name: part.reshape(shape) for (name, shape), part in zip(sites.items(), parts)}

    return jax.vmap(row)(rows_B)


def keep_to_masks(keep: dict | None, cfg: GPTConfig, dtype, scale=None) -> dict | None:
    """Inverted dropout's multipliers: 0 where dropped, 1 / (1 - dropout) where kept (scale: that, as an array)."""
    scale = np.asarray(1 / (1 - cfg.dropout), dtype) if scale is None else scale.astype(dtype)
    return None if keep is None else {name: k.astype(dtype) * scale for name, k in keep.items()}


def dropout_masks(key, cfg: GPTConfig, B, T, dtype) -> dict | None:
    """One training step's dropout masks for B rows of T positions (see dropout_keep), 0 or 1 / (1 - dropout)."""
    return keep_to_masks(dropout_keep(key, cfg, jnp.arange(B), T), cfg, dtype)


def dropped(x, masks, name):
    return x if masks is None else x * masks[name]


# -- the model ---------------------------------------------------------------------------------


class KVCache(NamedTuple):
    """Every layer's keys and values at every position decoded so far.

    k[layer] and v[layer] are [batch, kv heads, block_size, head size] (heads
    lead, as in attention; n_kv_head of them, so grouped-query attention
    shrinks the cache by n_head / n_kv_head), allocated once; a position's
    entry means something once it is written. Keys are stored as attention
    reads them: qk-normed and rotated.
    The layer axis is a tuple, not an array axis: inside the generation loop
    XLA updates separate buffers in place but copies a stacked
    [layer, ...] array on every step (5-8x slower decode steps, measured).
    """

    k: tuple
    v: tuple

    def write(self, layer, start, k_BGTK, v_BGTK):
        """The cache with positions start..start+T-1 of `layer` set."""
        k = jax.lax.dynamic_update_slice_in_dim(self.k[layer], k_BGTK, start, axis=2)
        v = jax.lax.dynamic_update_slice_in_dim(self.v[layer], v_BGTK, start, axis=2)
        return KVCache(_replace(self.k, layer, k), _replace(self.v, layer, v))


def _replace(items, i, item):
    return items[:i] + (item,) + items[i + 1 :]


def init_cache(cfg: GPTConfig, batch_size, dtype=jnp.float32) -> KVCache:
    shape = (batch_size, cfg.kv_heads, cfg.block_size, cfg.head_dim)
    empty = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layer))  # own buffers: they are donated
    return KVCache(empty(), empty())


@part("embed")
def embed(params, tokens_BT, positions_BT, cfg: GPTConfig):
    x_BTD = params["wte"][tokens_BT]
    if cfg.pos == "learned":
        x_BTD = x_BTD + params["wpe"][positions_BT]
    return normed(params, "embed_norm", x_BTD, cfg) if cfg.embed_norm else x_BTD


def positions_table(positions_BT, cfg: GPTConfig, dtype):
    """What the layers need of the positions: rope's (cos, sin), or None (learned positions are in the embedding)."""
    return rope_table(positions_BT, cfg.head_dim, dtype, cfg.rope_theta) if cfg.pos == "rope" else None


@part("attn_proj")
def qkv_heads(params, p, h_BTD, cfg: GPTConfig, rope):
    """q [B, H, T, K], k and v [B, G, T, K] of layer p, q and k qk-normed and rotated as cfg says."""
    q_BHTK = split_heads(linear(params, p + "attn_wq", h_BTD), cfg.n_head)
    k_BGTK, v_BGTK = (split_heads(linear(params, p + w, h_BTD), cfg.kv_heads) for w in ("attn_wk", "attn_wv"))
    if cfg.qk_norm:  # no gains: qk-norm is a plain rmsnorm
        q_BHTK, k_BGTK = rmsnorm(q_BHTK, cfg.norm_eps), rmsnorm(k_BGTK, cfg.norm_eps)
    if rope is not None:
        q_BHTK, k_BGTK = rotate(q_BHTK, rope), rotate(k_BGTK, rope)
    return q_BHTK, k_BGTK, v_BGTK


def block(params, i, x_BTD, mask_BTS, cfg: GPTConfig, rope=None, cache=None, start=0, attention="einsum", masks=None):
    """Layer i: x += attn(norm(x)); x += mlp(norm(x)). Returns (x, cache).

    Without a cache the T queries attend over the T keys of x itself
    (mask_BTS is [B, T, T]). With one, the T new keys and values are first
    written into layer i of the cache at positions start..start+T-1 and the
    queries attend over all block_size cached positions (mask_BTS is
    [B, T, block_size]): microgpt's "append k and v, then attend over the cache".
    attention (ATTENTIONS) applies to the first way only: the cache's way is
    always `attend`. masks: dropout's (dropout_masks), or None.
    """
    p = f"layer{i}."
    D, H = x_BTD.shape[-1], cfg.n_head
    q_BHTK, k_BGSK, v_BGSK = qkv_heads(params, p, normed(params, p + "attn_norm", x_BTD, cfg), cfg, rope)
    if cache is None and attention != "einsum" and masks is None:
        out_BHTK = attend_fused(q_BHTK, k_BGSK, v_BGSK, mask_BTS, attention)
    elif cache is None:  # also with dropout: the fused kernels take no mask on the attention weights
        out_BHTK = attend(q_BHTK, k_BGSK, v_BGSK, mask_BTS, QUERY_BLOCK, None if masks is None else masks[p + "attn"])
    else:
        cache = cache.write(i, start, k_BGSK, v_BGSK)
        out_BHTK = attend(q_BHTK, cache.k[i], cache.v[i], mask_BTS)
    with part("attn_proj"):  # concatenating the heads and applying wo, as one contraction over (head, k)
        attn_BTD = jnp.einsum("bhtk,dhk->btd", out_BHTK, params[p + "attn_wo"].reshape(D, H, D // H))
        attn_BTD = attn_BTD + params[p + "attn_wo_bias"] if cfg.bias else attn_BTD
    x_BTD = x_BTD + dropped(attn_BTD, masks, p + "attn_out")
    mlp_BTD = mlp(params, p, normed(params, p + "mlp_norm", x_BTD, cfg), cfg)
    return x_BTD + dropped(mlp_BTD, masks, p + "mlp_out"), cache


@part("head")
def output_logits(params, x_BTD, cfg: GPTConfig):
    """lm_head(x) (wte(x) when tied) after the final norm if any, soft-capped at C * tanh(logits / C) when logit_softcap is C > 0."""
    x_BTD = normed(params, "final_norm", x_BTD, cfg) if cfg.final_norm else x_BTD
    logits_BTV = x_BTD @ params["wte" if cfg.tie_embeddings else "lm_head"].T
    if not cfg.logit_softcap:
        return logits_BTV
    return jnp.tanh(logits_BTV * cfg.logit_softcap**-1) * cfg.logit_softcap  # the scalar engine's (l * C**-1).tanh() * C


def forward(params, tokens_BT, cfg: GPTConfig, positions_BT=None, segments_BT=None, attention="einsum", masks=None):
    """Logits [B, T, V] for every position of every row, all at once.

    Without positions and segments each row is one document starting at
    position 0, and this equals running microgpt's token-by-token model over
    the row with its KV cache. attention: one of ATTENTIONS (static).
    masks: dropout's for these B rows (dropout_masks), None for none (evaluation).
    """
    B, T = tokens_BT.shape
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask_BTS = attention_mask(positions_BT, segments_BT)
    rope = positions_table(positions_BT, cfg, params["wte"].dtype)

    x_BTD = embed(params, tokens_BT, positions_BT, cfg)
    for i in range(cfg.n_layer):
        x_BTD, _ = block(params, i, x_BTD, mask_BTS, cfg, rope, attention=attention, masks=masks)
    return output_logits(params, x_BTD, cfg)


def forward_cached(params, tokens_BT, cache: KVCache, start, cfg: GPTConfig):
    """(logits [B, T, V], cache) for tokens at positions start..start+T-1 of every row.

    The rows continue what the cache holds at positions < start; the tokens'
    keys and values are written into the cache. The caller keeps
    start + T <= block_size (beyond it JAX would clamp, not fail).
    """
    B, T = tokens_BT.shape
    positions_T = start + jnp.arange(T)
    positions_BT = jnp.broadcast_to(positions_T, (B, T))
    # causal by position: a cached slot s is seen iff it has been written, s <= t
    mask_1TS = (jnp.arange(cfg.block_size)[None, :] <= positions_T[:, None])[None]
    rope = positions_table(positions_BT, cfg, params["wte"].dtype)
    x_BTD = embed(params, tokens_BT, positions_BT, cfg)
    for i in range(cfg.n_layer):
        x_BTD, cache = block(params, i, x_BTD, mask_1TS, cfg, rope, cache, start)
    return output_logits(params, x_BTD, cfg), cache


@partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def decode_step(params, token_B, cache: KVCache, pos, cfg: GPTConfig):
    """One token per row at position pos: (next-token logits [B, V], cache with its keys and values)."""
    logits_B1V, cache = forward_cached(params, token_B[:, None], cache, pos, cfg)
    return logits_B1V[:, 0], cache


def loss_fn(params, batch, cfg: GPTConfig, attention="einsum", masks=None, per_row=False):
    """sum(weights * -log p(target)): per document the mean over its positions, then the mean over documents.

    masks: dropout's for the batch's rows (dropout_masks), None for none. per_row: each row's sum [B] instead.
    """
    logits_BTV = forward(params, batch.tokens, cfg, batch.positions, batch.segments, attention, masks)
    with part("loss"):
        # bfloat16 compute: the softmax and the loss still in float32
        logits_BTV = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))
        logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
        # the target's log-probability picked by a one-hot mask: one fused multiply-sum, no gather and scatter
        target_BTV = batch.targets[..., None] == jnp.arange(logp_BTV.shape[-1])
        nll_BT = -jnp.sum(jnp.where(target_BTV, logp_BTV, 0), axis=-1)
        loss_BT = batch.weights.astype(nll_BT.dtype) * nll_BT
        return jnp.sum(loss_BT, axis=-1) if per_row else jnp.sum(loss_BT)
