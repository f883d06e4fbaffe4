"""microgpt, the scalar way: a GPT where every number is a `Value`.

This follows ../shared/spec/microgpt.md line by line. The order of every
random draw and of every floating-point operation is the spec's, because the
JAX package is checked against exactly these numbers: with every option at
its default this is the seed program, bit for bit (spec section 7).

The variants of issue 11 (the contract both engines implement) are options
of the config, each off by default: another norm or activation (looked up by
name in NORMS and ACTIVATIONS: add an entry to add one), rotary positions,
tied embeddings, qk-norm, grouped-query attention, a logit softcap, dropout
(masks passed in, drawn by the caller), and in the optimizer weight decay,
gradient clipping, warmup and a cosine schedule with a floor. And the pieces
of GPT-2's and Llama's blocks (issue 21): norm gains (and layernorm biases),
which norms there are (after the embedding, before the head), biases in the
blocks' linear layers, a gated MLP of its own width, rope's base and the
norms' epsilon. A gain or bias is a vector (a list of Values), every other
weight a matrix (a list of rows).

`cfg` is anything with the fields of `Config` below (the JAX package's
GPTConfig fits: same names, n_kv_head = 0 meaning n_head).
"""

import math
from typing import NamedTuple

from reference.engine import Value


class Config(NamedTuple):
    vocab_size: int
    n_embd: int = 16
    n_head: int = 4
    n_layer: int = 1
    block_size: int = 16
    norm: str = "rmsnorm"
    activation: str = "relu"
    pos: str = "learned"  # or "rope": no wpe, rotary q and k
    tie_embeddings: bool = False
    qk_norm: bool = False
    n_kv_head: int = 0  # 0: one key/value head per query head
    logit_softcap: float = 0.0  # 0: off
    dropout: float = 0.0  # the masks' rate; the model multiplies in whatever masks it is given
    norm_gain: bool = False  # a gain (init 1) on every norm, and a bias (init 0) on a layernorm
    embed_norm: bool = True  # the norm right after the embedding (microgpt's)
    final_norm: bool = False  # a norm before the output layer
    bias: bool = False  # a bias (init 0) in every linear layer of the blocks
    mlp: str = "plain"  # or "gated": fc2(act(gate x) * fc1 x)
    mlp_hidden: int = 0  # 0: 4 * n_embd
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


# Adam hyperparameters of the seed (spec section 4).
LEARNING_RATE, BETA1, BETA2, EPS = 0.01, 0.85, 0.99, 1e-8
TEMPERATURE = 0.5
GELU_C = (2 / math.pi) ** 0.5


def head_dim(cfg):
    return cfg.n_embd // cfg.n_head


def kv_heads(cfg):
    return cfg.n_kv_head or cfg.n_head


def hidden(cfg):
    return cfg.mlp_hidden or 4 * cfg.n_embd


def check_config(cfg):
    """The config's problem in words, or None: what the model needs of its shape and names."""
    if cfg.n_embd % cfg.n_head:
        return f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})"
    if cfg.n_head % kv_heads(cfg):
        return f"n_kv_head ({cfg.n_kv_head}) must divide n_head ({cfg.n_head})"
    if cfg.pos == "rope" and head_dim(cfg) % 2:
        return f"rope needs an even head_dim, got {head_dim(cfg)} (n_embd / n_head)"
    for field, table in (("norm", NORMS), ("activation", ACTIVATIONS), ("pos", POSITIONS), ("mlp", MLPS)):
        if getattr(cfg, field) not in table:
            return f"{field} must be one of {', '.join(table)}, got {getattr(cfg, field)!r}"
    return None


def param_shapes(cfg):
    """(name, [out, in]) of every weight matrix, in the spec's creation order.

    wpe is not made under rope, lm_head not with tied embeddings (so they draw
    no random numbers either); attn_wk and attn_wv have n_kv_head heads; a
    gated MLP has mlp_gate before mlp_fc1.
    """
    d, kv, f = cfg.n_embd, kv_heads(cfg) * head_dim(cfg), hidden(cfg)
    shapes = [("wte", (cfg.vocab_size, d))]
    if cfg.pos == "learned":
        shapes.append(("wpe", (cfg.block_size, d)))
    if not cfg.tie_embeddings:
        shapes.append(("lm_head", (cfg.vocab_size, d)))
    for i in range(cfg.n_layer):
        shapes += [
            (f"layer{i}.attn_wq", (d, d)),
            (f"layer{i}.attn_wk", (kv, d)),
            (f"layer{i}.attn_wv", (kv, d)),
            (f"layer{i}.attn_wo", (d, d)),
        ]
        if cfg.mlp == "gated":
            shapes.append((f"layer{i}.mlp_gate", (f, d)))
        shapes += [(f"layer{i}.mlp_fc1", (f, d)), (f"layer{i}.mlp_fc2", (d, f))]
    return shapes


def norm_sites(cfg):
    """The norms, by name: after the embedding, before each layer's attention and MLP, before the head."""
    layers = [f"layer{i}.{part}_norm" for i in range(cfg.n_layer) for part in ("attn", "mlp")]
    return ["embed_norm"] * cfg.embed_norm + layers + ["final_norm"] * cfg.final_norm


def vector_shapes(cfg):
    """(name, n) of every gain ({norm}_gain) and bias ({norm}_bias, {matrix}_bias): none by default."""
    shapes = []
    if cfg.norm_gain:
        for site in norm_sites(cfg):
            shapes.append((site + "_gain", cfg.n_embd))
            if cfg.norm == "layernorm":
                shapes.append((site + "_bias", cfg.n_embd))
    if cfg.bias:
        shapes += [(name + "_bias", n_out) for name, (n_out, _) in param_shapes(cfg) if name.startswith("layer")]
    return shapes


def init_state(cfg, rng, std=0.08):
    """Every weight matrix drawn with rng.gauss(0, std), matrix by matrix, row by row; then gains 1 and biases 0."""
    state = {name: [[Value(rng.gauss(0, std)) for _ in range(n_in)] for _ in range(n_out)] for name, (n_out, n_in) in param_shapes(cfg)}
    for name, n in vector_shapes(cfg):
        state[name] = [Value(1.0 if name.endswith("_gain") else 0.0) for _ in range(n)]
    return state


def entries(w):
    """A matrix's entries row by row, or a vector's."""
    return [p for row in w for p in (row if isinstance(row, list) else [row])]


def parameters(state):
    """The flat parameter list Adam walks: every entry of every matrix, row-major, and of every vector."""
    return [p for w in state.values() for p in entries(w)]


# --- the building blocks (spec section 3) ---


def linear(x, w, b=None):
    out = [sum(wi * xi for wi, xi in zip(row, x)) for row in w]
    return out if b is None else [o + bi for o, bi in zip(out, b)]


def layer(state, name, x):
    """The linear layer `name` of the state: its matrix, and its bias if the model has biases."""
    return linear(x, state[name], state.get(name + "_bias"))


def softmax(logits):
    max_val = max(v.data for v in logits)  # a plain float: no gradient through the max
    exps = [(v - max_val).exp() for v in logits]
    total = sum(exps)
    return [e / total for e in exps]


def rmsnorm(x, eps=1e-5):
    ms = sum(xi * xi for xi in x) / len(x)
    scale = (ms + eps) ** -0.5
    return [xi * scale for xi in x]


def layernorm(x, eps=1e-5):
    # rmsnorm of the centred vector (gain and bias, if any, come after: see `norm`)
    mu = sum(x) / len(x)
    c = [xi - mu for xi in x]
    var = sum(ci * ci for ci in c) / len(x)
    scale = (var + eps) ** -0.5
    return [ci * scale for ci in c]


def gelu(x):
    # the tanh approximation (jax.nn.gelu(approximate=True))
    return 0.5 * x * (1 + (GELU_C * (x + 0.044715 * x**3)).tanh())


def gelu_exact(x):
    # the erf form (jax.nn.gelu(approximate=False))
    return 0.5 * x * (1 + (x * 2**-0.5).erf())


def relu2(x):
    return x.relu() ** 2


def silu(x):
    return x * (1 + (-x).exp()) ** -1


# A norm maps a vector to a vector, an activation a number to a number. One entry adds one (and its flag choice).
NORMS = {"rmsnorm": rmsnorm, "layernorm": layernorm}
ACTIVATIONS = {"relu": Value.relu, "gelu": gelu, "gelu_exact": gelu_exact, "relu2": relu2, "silu": silu}
POSITIONS = ("learned", "rope")
MLPS = ("plain", "gated")


def norm(state, cfg, site, x):
    """The norm at `site`, times its gain and plus its bias where the model has them."""
    x = NORMS[cfg.norm](x, cfg.norm_eps)
    if site + "_gain" in state:
        x = [xi * g for xi, g in zip(x, state[site + "_gain"])]
    if site + "_bias" in state:
        x = [xi + b for xi, b in zip(x, state[site + "_bias"])]
    return x


def rope(x, pos_id, base):
    """One head's vector rotated pair by pair (i, i + half) by angle pos_id * base^(-2i/K)."""
    half = len(x) // 2
    out = [None] * len(x)
    for i in range(half):
        angle = pos_id * base ** (-2 * i / len(x))
        c, s = math.cos(angle), math.sin(angle)  # plain numbers: no gradient through the angle
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i] * s + x[i + half] * c
    return out


def per_head(f, x, size):
    """f applied to each head's slice of x (heads of `size` entries), concatenated back."""
    return [y for hs in range(0, len(x), size) for y in f(x[hs : hs + size])]


def dropped(x, row):
    """x times this position's dropout mask (constants, 0 or 1/(1-p)); x itself without masks."""
    return x if row is None else [xi * m for xi, m in zip(x, row)]


def mask_row(masks, name, pos_id):
    return None if masks is None else masks[name][pos_id]


def dropout_masks(cfg, n, rng):
    """One document's masks for n positions (the contract's dict): each entry 0 with probability
    cfg.dropout, else 1 / (1 - cfg.dropout), drawn with rng.random() layer by layer, in the dict's order."""
    keep = 1 / (1 - cfg.dropout)
    draw = lambda: 0.0 if rng.random() < cfg.dropout else keep
    masks = {}
    for i in range(cfg.n_layer):
        masks[f"layer{i}.attn"] = [[[draw() for _ in range(n)] for _ in range(n)] for _ in range(cfg.n_head)]
        masks[f"layer{i}.attn_out"] = [[draw() for _ in range(cfg.n_embd)] for _ in range(n)]
        masks[f"layer{i}.mlp_out"] = [[draw() for _ in range(cfg.n_embd)] for _ in range(n)]
    return masks


# --- the model, one token at a time (spec section 3) ---


def attention(state, cfg, li, x, pos_id, keys, values, masks=None):
    """This token's query against every cached key of the layer (so it is causal by construction)."""
    hd = head_dim(cfg)
    q = layer(state, f"layer{li}.attn_wq", x)
    k = layer(state, f"layer{li}.attn_wk", x)
    v = layer(state, f"layer{li}.attn_wv", x)
    if cfg.qk_norm:  # before rope, as the contract says; never a gain
        qk_norm = lambda h: rmsnorm(h, cfg.norm_eps)
        q, k = per_head(qk_norm, q, hd), per_head(qk_norm, k, hd)
    if cfg.pos == "rope":
        turn = lambda h: rope(h, pos_id, cfg.rope_theta)
        q, k = per_head(turn, q, hd), per_head(turn, k, hd)
    keys.append(k)  # the cache holds rotated keys
    values.append(v)
    group = cfg.n_head // kv_heads(cfg)  # query heads per key/value head
    x_attn = []
    for h in range(cfg.n_head):
        hs, ks = h * hd, (h // group) * hd
        q_h = q[hs : hs + hd]
        k_h = [ki[ks : ks + hd] for ki in keys]
        v_h = [vi[ks : ks + hd] for vi in values]
        attn_logits = [sum(q_h[j] * k_s[j] for j in range(hd)) / hd**0.5 for k_s in k_h]
        w = softmax(attn_logits)
        if masks is not None:
            w = dropped(w, masks[f"layer{li}.attn"][h][pos_id])
        x_attn.extend(sum(w[s] * v_h[s][j] for s in range(len(v_h))) for j in range(hd))
    return layer(state, f"layer{li}.attn_wo", x_attn)


def gpt(state, cfg, token_id, pos_id, keys, values, masks=None):
    """Logits for one token at one position; appends its keys and values to the cache.

    keys and values: one list per layer. masks: one document's dropout masks
    (the contract's per-row dict), or None for no dropout.
    """
    act = ACTIVATIONS[cfg.activation]
    x = state["wte"][token_id]
    if cfg.pos == "learned":
        x = [t + p for t, p in zip(x, state["wpe"][pos_id])]
    if cfg.embed_norm:
        x = norm(state, cfg, "embed_norm", x)
    for li in range(cfg.n_layer):
        x_residual = x
        x = attention(state, cfg, li, norm(state, cfg, f"layer{li}.attn_norm", x), pos_id, keys[li], values[li], masks)
        x = dropped(x, mask_row(masks, f"layer{li}.attn_out", pos_id))
        x = [a + b for a, b in zip(x, x_residual)]
        # MLP
        x_residual = x
        x_in = norm(state, cfg, f"layer{li}.mlp_norm", x)
        up = layer(state, f"layer{li}.mlp_fc1", x_in)
        if cfg.mlp == "gated":  # act(gate x) * fc1 x
            x = [act(g) * u for g, u in zip(layer(state, f"layer{li}.mlp_gate", x_in), up)]
        else:
            x = [act(u) for u in up]
        x = layer(state, f"layer{li}.mlp_fc2", x)
        x = dropped(x, mask_row(masks, f"layer{li}.mlp_out", pos_id))
        x = [a + b for a, b in zip(x, x_residual)]
    if cfg.final_norm:
        x = norm(state, cfg, "final_norm", x)
    logits = linear(x, state["wte"] if cfg.tie_embeddings else state["lm_head"])
    if cfg.logit_softcap:  # C * tanh(l / C): logits bounded by C, smoothly
        logits = [(l / cfg.logit_softcap).tanh() * cfg.logit_softcap for l in logits]
    return logits


def empty_cache(cfg):
    return [[] for _ in range(cfg.n_layer)], [[] for _ in range(cfg.n_layer)]


def sequence_logits(state, cfg, tokens, masks=None):
    """Token-by-token logits over a sequence, with a growing KV cache."""
    keys, values = empty_cache(cfg)
    return [gpt(state, cfg, t, p, keys, values, masks) for p, t in enumerate(tokens)]


# --- training (spec section 4) ---


def loss(state, cfg, tokens, masks=None):
    """Mean next-token loss over the first n = min(block_size, len-1) positions."""
    n = min(cfg.block_size, len(tokens) - 1)
    keys, values = empty_cache(cfg)
    losses = []
    for pos_id in range(n):
        probs = softmax(gpt(state, cfg, tokens[pos_id], pos_id, keys, values, masks))
        losses.append(-probs[tokens[pos_id + 1]].log())
    return (1 / n) * sum(losses)


def backward_batch(state, cfg, docs, grad_accum=1, masks=None):
    """Gradients of a batch's loss (1/B) * sum(per-document loss), added into the weights' .grad.

    docs: B encoded documents; masks: one masks dict per document, or None.
    With grad_accum K the batch is K micro-batches of consecutive documents,
    each one's (1/B) * sum(its losses) backpropagated in turn (the gradients
    add up). A single document is the seed's step: its loss, no extra node.
    Returns the batch's loss.
    """
    B = len(docs)
    masks = [None] * B if masks is None else masks
    size = B // grad_accum
    total = 0.0
    for start in range(0, B, size):
        losses = [loss(state, cfg, t, m) for t, m in zip(docs[start : start + size], masks[start : start + size])]
        part = losses[0] if B == 1 else (1 / B) * sum(losses)
        part.backward()
        total += part.data
    return total


# The learning rate's decay after the warmup: a multiplier of (lr - min_lr), from 1 at u = 0 to 0 at u = 1.
SCHEDULES = {"linear": lambda u: 1 - u, "cosine": lambda u: 0.5 * (1 + math.cos(math.pi * u))}


class Adam:
    """Adam with a learning rate that decays to min_lr over num_steps (spec section 4, and the contract's options).

    weight_decay: decoupled (AdamW); grad_clip: the global L2 norm of the
    gradients is at most this; warmup: steps of linear rise from 0 to lr.
    With every option off the arithmetic is the seed's, expression for expression.
    """

    def __init__(
        self,
        params,
        num_steps,
        lr=LEARNING_RATE,
        beta1=BETA1,
        beta2=BETA2,
        eps=EPS,
        weight_decay=0.0,
        grad_clip=0.0,
        schedule="linear",
        min_lr=0.0,
        warmup=0,
    ):
        self.params, self.num_steps = params, num_steps
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.weight_decay, self.grad_clip, self.schedule, self.min_lr, self.warmup = weight_decay, grad_clip, schedule, min_lr, warmup
        self.m = [0.0] * len(params)
        self.v = [0.0] * len(params)

    def lr_at(self, step):
        if (self.schedule, self.min_lr, self.warmup) == ("linear", 0, 0):
            return self.lr * (1 - step / self.num_steps)  # the seed's expression
        if step < self.warmup:
            return self.lr * step / self.warmup
        u = (step - self.warmup) / (self.num_steps - self.warmup)
        return self.min_lr + (self.lr - self.min_lr) * SCHEDULES[self.schedule](u)

    def clipped_grads(self):
        grads = [p.grad for p in self.params]
        if not self.grad_clip:
            return grads
        norm = sum(g**2 for g in grads) ** 0.5
        return grads if norm <= self.grad_clip else [g * (self.grad_clip / norm) for g in grads]

    def step(self, step):
        lr_t = self.lr_at(step)
        b1, b2 = self.beta1, self.beta2
        for i, (p, g) in enumerate(zip(self.params, self.clipped_grads())):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g**2
            m_hat = self.m[i] / (1 - b1 ** (step + 1))
            v_hat = self.v[i] / (1 - b2 ** (step + 1))
            if self.weight_decay:
                p.data -= lr_t * (m_hat / (v_hat**0.5 + self.eps) + self.weight_decay * p.data)
            else:
                p.data -= lr_t * m_hat / (v_hat**0.5 + self.eps)
            p.grad = 0


def train_batch(state, cfg, adam, step, docs, grad_accum=1, masks=None):
    """One step on a batch of encoded documents: gradients (accumulated over grad_accum parts), Adam. Returns the loss."""
    step_loss = backward_batch(state, cfg, docs, grad_accum, masks)
    adam.step(step)
    return step_loss


def train_step(state, cfg, adam, step, tokens, masks=None):
    """One spec step on one encoded document: forward, backward, Adam. Returns the loss."""
    return train_batch(state, cfg, adam, step, [tokens], masks=None if masks is None else [masks])


# --- inference (spec section 5) ---


def sample(state, cfg, rng, bos, temperature=TEMPERATURE):
    """One sequence of token ids, drawn with rng.choices, stopping at BOS or block_size."""
    keys, values = empty_cache(cfg)
    token_id, out = bos, []
    for pos_id in range(cfg.block_size):
        logits = gpt(state, cfg, token_id, pos_id, keys, values)
        probs = softmax([l / temperature for l in logits])
        token_id = rng.choices(range(cfg.vocab_size), weights=[p.data for p in probs])[0]
        if token_id == bos:
            break
        out.append(token_id)
    return out
