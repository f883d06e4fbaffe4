"""microgpt, the scalar way: a GPT where every number is a `Value`.

This follows ../shared/spec/microgpt.md line by line. The order of every
random draw and of every floating-point operation is the spec's, because the
JAX package is checked against exactly these numbers.

`cfg` is anything with the fields vocab_size, n_embd, n_head, n_layer and
block_size (the JAX package's GPTConfig fits, and so does `Config` below).
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


# Adam hyperparameters of the seed (spec section 4).
LEARNING_RATE, BETA1, BETA2, EPS = 0.01, 0.85, 0.99, 1e-8
TEMPERATURE = 0.5


def param_shapes(cfg):
    """(name, [out, in]) of every weight matrix, in the spec's creation order."""
    d = cfg.n_embd
    shapes = [("wte", (cfg.vocab_size, d)), ("wpe", (cfg.block_size, d)), ("lm_head", (cfg.vocab_size, d))]
    for i in range(cfg.n_layer):
        shapes += [
            (f"layer{i}.attn_wq", (d, d)),
            (f"layer{i}.attn_wk", (d, d)),
            (f"layer{i}.attn_wv", (d, d)),
            (f"layer{i}.attn_wo", (d, d)),
            (f"layer{i}.mlp_fc1", (4 * d, d)),
            (f"layer{i}.mlp_fc2", (d, 4 * d)),
        ]
    return shapes


def init_state(cfg, rng, std=0.08):
    """Every weight drawn with rng.gauss(0, std), matrix by matrix, row by row."""
    return {name: [[Value(rng.gauss(0, std)) for _ in range(n_in)] for _ in range(n_out)] for name, (n_out, n_in) in param_shapes(cfg)}


def parameters(state):
    """The flat parameter list Adam walks: every entry of every matrix, row-major."""
    return [p for matrix in state.values() for row in matrix for p in row]


# --- the model (spec section 3) ---


def linear(x, w):
    return [sum(wi * xi for wi, xi in zip(row, x)) for row in w]


def softmax(logits):
    max_val = max(v.data for v in logits)  # a plain float: no gradient through the max
    exps = [(v - max_val).exp() for v in logits]
    total = sum(exps)
    return [e / total for e in exps]


def rmsnorm(x):
    ms = sum(xi * xi for xi in x) / len(x)
    scale = (ms + 1e-5) ** -0.5
    return [xi * scale for xi in x]


def gpt(state, cfg, token_id, pos_id, keys, values):
    """Logits for one token at one position; appends its keys and values to the cache."""
    head_dim = cfg.n_embd // cfg.n_head
    x = [t + p for t, p in zip(state["wte"][token_id], state["wpe"][pos_id])]
    x = rmsnorm(x)
    for li in range(cfg.n_layer):
        # attention: this token's query against every cached key (so it is causal by construction)
        x_residual = x
        x = rmsnorm(x)
        q = linear(x, state[f"layer{li}.attn_wq"])
        k = linear(x, state[f"layer{li}.attn_wk"])
        v = linear(x, state[f"layer{li}.attn_wv"])
        keys[li].append(k)
        values[li].append(v)
        x_attn = []
        for h in range(cfg.n_head):
            hs = h * head_dim
            q_h = q[hs : hs + head_dim]
            k_h = [ki[hs : hs + head_dim] for ki in keys[li]]
            v_h = [vi[hs : hs + head_dim] for vi in values[li]]
            attn_logits = [sum(q_h[j] * k_s[j] for j in range(head_dim)) / math.sqrt(head_dim) for k_s in k_h]
            w = softmax(attn_logits)
            x_attn.extend(sum(w[s] * v_h[s][j] for s in range(len(v_h))) for j in range(head_dim))
        x = linear(x_attn, state[f"layer{li}.attn_wo"])
        x = [a + b for a, b in zip(x, x_residual)]
        # MLP
        x_residual = x
        x = rmsnorm(x)
        x = [xi.relu() for xi in linear(x, state[f"layer{li}.mlp_fc1"])]
        x = linear(x, state[f"layer{li}.mlp_fc2"])
        x = [a + b for a, b in zip(x, x_residual)]
    return linear(x, state["lm_head"])


def empty_cache(cfg):
    return [[] for _ in range(cfg.n_layer)], [[] for _ in range(cfg.n_layer)]


def sequence_logits(state, cfg, tokens):
    """Token-by-token logits over a sequence, with a growing KV cache."""
    keys, values = empty_cache(cfg)
    return [gpt(state, cfg, t, p, keys, values) for p, t in enumerate(tokens)]


# --- training (spec section 4) ---


def loss(state, cfg, tokens):
    """Mean next-token loss over the first n = min(block_size, len-1) positions."""
    n = min(cfg.block_size, len(tokens) - 1)
    keys, values = empty_cache(cfg)
    losses = []
    for pos_id in range(n):
        probs = softmax(gpt(state, cfg, tokens[pos_id], pos_id, keys, values))
        losses.append(-probs[tokens[pos_id + 1]].log())
    return (1 / n) * sum(losses)


class Adam:
    """Adam with a linear learning-rate decay to zero over num_steps."""

    def __init__(self, params, num_steps, lr=LEARNING_RATE, beta1=BETA1, beta2=BETA2, eps=EPS):
        self.params, self.num_steps = params, num_steps
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = [0.0] * len(params)
        self.v = [0.0] * len(params)

    def step(self, step):
        lr_t = self.lr * (1 - step / self.num_steps)
        b1, b2 = self.beta1, self.beta2
        for i, p in enumerate(self.params):
            self.m[i] = b1 * self.m[i] + (1 - b1) * p.grad
            self.v[i] = b2 * self.v[i] + (1 - b2) * p.grad**2
            m_hat = self.m[i] / (1 - b1 ** (step + 1))
            v_hat = self.v[i] / (1 - b2 ** (step + 1))
            p.data -= lr_t * m_hat / (math.sqrt(v_hat) + self.eps)
            p.grad = 0


def train_step(state, cfg, adam, step, tokens):
    """One spec step on one encoded document: forward, backward, Adam. Returns the loss."""
    step_loss = loss(state, cfg, tokens)
    step_loss.backward()
    adam.step(step)
    return step_loss.data


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
