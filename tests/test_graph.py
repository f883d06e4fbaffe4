"""The graph instrumentation: counts, stages, lifetimes and diagrams of the scalar engine, and the JAX program's."""

import math
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from reference import graph
from reference.engine import Value

SEED_CFG = reference.Config(vocab_size=27)  # microgpt's shape
SMALL_CFG = reference.Config(vocab_size=7, n_embd=8, n_head=2, n_layer=1, block_size=6)
DEEP_CFG = reference.Config(vocab_size=7, n_embd=8, n_head=2, n_layer=2, block_size=6)


def state_for(cfg, seed=0):
    return reference.init_state(cfg, random.Random(seed))


def tokens_for(cfg, n):
    bos = cfg.vocab_size - 1
    return [bos] + [i % bos for i in range(n - 2)] + [bos]


# --- node counts derived from the spec, independently of the instrumentation ---
# Every operation is one node and every wrapped constant one more: sum() starts from
# the constant 0, x / c is x * c**-1, -x is x * -1, x - c is x + (-c).


def linear_nodes(n_out, n_in):
    return n_out * (2 * n_in + 1)  # per row: n_in products, n_in additions, the constant 0


def rmsnorm_nodes(n):
    return 3 * n + 6  # squares, their sum, / n, + eps, ** -0.5, the scaled entries


def softmax_nodes(n):
    return 6 * n + 1  # - max, exp, sum, and a ** -1 and a product per entry


def token_nodes(cfg, pos):
    """Nodes one gpt() call builds at position pos (pos + 1 cached keys)."""
    n, K, L, F = cfg.n_embd, cfg.n_embd // cfg.n_head, pos + 1, 4 * cfg.n_embd
    per_head = L * (2 * K + 3) + softmax_nodes(L) + K * (2 * L + 1)  # scores, softmax, weighted sums
    layer = (
        rmsnorm_nodes(n)
        + 4 * linear_nodes(n, n)
        + cfg.n_head * per_head
        + n
        + rmsnorm_nodes(n)
        + linear_nodes(F, n)
        + F
        + linear_nodes(n, F)
        + n
    )
    return n + rmsnorm_nodes(n) + cfg.n_layer * layer + linear_nodes(cfg.vocab_size, n)


def step_nodes(cfg, n):
    """Nodes a training step over n positions builds: the tokens, then softmax, -log, the mean."""
    return sum(token_nodes(cfg, p) for p in range(n)) + n * (softmax_nodes(cfg.vocab_size) + 3) + n + 1 + 2


# --- statistics ---


def test_graph_stats_of_a_small_expression():
    w = Value(2.0)
    state = {"w": [[w]]}
    y = (w * w + 3).log()  # w*w, the constant 3, +, log
    stats = graph.graph_stats(y, state)
    assert stats.nodes == 5
    assert stats.by_role == {"weight": 1, "constant": 1, "temporary": 3}
    assert stats.by_op == {"leaf": 2, "*": 1, "+": 1, "log": 1}
    assert stats.edges == 2 + 2 + 1
    assert stats.depth == 3  # log -> + -> * -> w


@pytest.mark.parametrize("cfg", [SEED_CFG, DEEP_CFG], ids=["seed", "2-layer"])
def test_token_pass_counts_every_node_by_stage(cfg):
    state = state_for(cfg)
    keys, values = graph.empty_cache(cfg)
    n, V = cfg.n_embd, cfg.vocab_size
    for pos, token in enumerate([V - 1, 0, 1]):
        logits, tp = graph.token_pass(state, cfg, token, pos, keys, values)
        assert tp.built == token_nodes(cfg, pos)
        assert tp.roles["temporary"] + tp.roles["constant"] == tp.built
        assert set(tp.stages) == set(graph.stage_order(cfg.n_layer))
        for i in range(cfg.n_layer):
            for kind in ("query", "key", "value"):
                assert tp.stages[f"layer{i}.{kind}"] == linear_nodes(n, n)
        assert tp.stages["logits"] == linear_nodes(V, n)
        # the token reads its own embedding rows and every other matrix whole, and every cached entry
        assert tp.weights_read["wte"] == (n, V * n)
        assert tp.weights_read["wpe"] == (n, cfg.block_size * n)
        assert tp.weights_read["lm_head"] == (V * n, V * n)
        assert tp.roles["kv cache"] == 2 * cfg.n_layer * n * pos
        assert tp.cache_after == [(pos + 1, pos + 1)] * cfg.n_layer
        assert tp.edges["lm_head", "logits"] == V * n
        assert tp.edges["wte", "embeddings"] == n
        assert tp.edges.get(("kv cache", "layer0.attention"), 0) == 2 * n * pos
        assert [round(l.data, 12) for l in logits] == [
            round(l.data, 12) for l in reference.sequence_logits(state, cfg, [V - 1, 0, 1][: pos + 1])[-1]
        ]


def test_token_pass_depth_is_the_longest_path():
    cfg = SMALL_CFG
    state = state_for(cfg)
    keys, values = graph.empty_cache(cfg)
    logits, tp = graph.token_pass(state, cfg, 0, 0, keys, values)

    def longest(v, memo={}):  # noqa: B006 (one memo across the recursion)
        if id(v) not in memo:
            memo[id(v)] = 1 + max((longest(c) for c in v._children), default=-1)
        return memo[id(v)]

    assert tp.depth == max(longest(l) for l in logits)


# --- training: build, hold, backward, update, destroy ---


def test_trace_train_step_is_train_step_and_counts_the_step():
    cfg = SEED_CFG
    tokens = [26, 4, 12, 12, 0, 26]
    n = len(tokens) - 1
    state_a, state_b = state_for(cfg, 1), state_for(cfg, 1)
    adam_a = reference.Adam(reference.parameters(state_a), 10)
    adam_b = reference.Adam(reference.parameters(state_b), 10)
    for s in range(2):
        trace = graph.trace_train_step(state_a, cfg, adam_a, s, tokens)
        want = reference.train_step(state_b, cfg, adam_b, s, tokens)
        assert trace.loss == want
        assert [p.data for p in reference.parameters(state_a)] == [p.data for p in reference.parameters(state_b)]
    assert trace.positions == n
    assert trace.built_per_token == [token_nodes(cfg, p) for p in range(n)]
    assert trace.built == step_nodes(cfg, n)
    assert trace.logits == n * cfg.vocab_size
    # held for backward: everything built except the probabilities of the other V - 1 tokens (x ** -1 and *)
    held = trace.built - n * (cfg.vocab_size - 1) * 2
    assert trace.graph.by_role["temporary"] + trace.graph.by_role["constant"] == held
    assert trace.held == held == {label: alive for label, _, alive in trace.tracker.marks}["built"]
    assert trace.alive_after == 0


def test_step_zero_updates_exactly_the_weights_with_a_gradient():
    cfg = SMALL_CFG
    state, probe = state_for(cfg), state_for(cfg)
    tokens = tokens_for(cfg, 4)
    reference.loss(probe, cfg, tokens).backward()
    nonzero = sum(p.grad != 0 for p in reference.parameters(probe))
    trace = graph.trace_train_step(state, cfg, reference.Adam(reference.parameters(state), 5), 0, tokens)
    assert trace.grads_nonzero == nonzero
    assert trace.weights_updated == nonzero  # at step 0, m is nonzero exactly where the gradient is
    assert nonzero < len(reference.parameters(state))  # unused embedding rows get no gradient


def test_no_temporary_outlives_a_training_step():
    cfg = SMALL_CFG
    state = state_for(cfg)
    adam = reference.Adam(reference.parameters(state), 5)
    tokens = tokens_for(cfg, 5)
    weights = reference.parameters(state)
    with graph.tracking() as tracker:
        reference.train_step(state, cfg, adam, 0, tokens)
    assert tracker.created == step_nodes(cfg, len(tokens) - 1)
    assert tracker.alive == 0 and tracker.alive_nodes() == []
    assert reference.parameters(state) == weights  # the very same weight nodes, updated in place

    with graph.tracking() as tracker:
        kept = reference.loss(state, cfg, tokens)  # a graph that is still referenced stays alive
    assert tracker.alive == graph.graph_stats(kept, state).by_role["temporary"] + graph.graph_stats(kept, state).by_role["constant"]
    del kept
    assert tracker.alive == 0


def test_tracking_restores_the_engine():
    init = Value.__init__
    with pytest.raises(RuntimeError):
        with graph.tracking() as outer, graph.tracking() as inner:
            Value(1.0) + 2
            raise RuntimeError
    assert Value.__init__ is init
    assert outer.created == inner.created == 3
    Value(1.0)
    assert outer.created == 3


# --- inference: only the cache outlives a token ---


@pytest.mark.parametrize("cfg", [SMALL_CFG, DEEP_CFG], ids=["1-layer", "2-layer"])
def test_between_tokens_only_the_cache_and_what_it_references_is_alive(cfg):
    state = state_for(cfg)
    tokens = tokens_for(cfg, cfg.block_size)
    trace = graph.trace_inference(state, cfg, tokens)
    n = cfg.n_embd
    assert trace.other_alive == [0] * len(tokens)
    # one key and one value per layer per token, n_embd nodes each
    assert [tp.cache_after for tp in trace.passes] == [[(t + 1, t + 1)] * cfg.n_layer for t in range(len(tokens))]
    assert trace.cache_nodes == [2 * cfg.n_layer * n * (t + 1) for t in range(len(tokens))]
    last = cfg.n_layer - 1
    for tp, kept in zip(trace.passes, trace.kept):
        # the top layer's query, attention, MLP and the logits are gone; its keys and values are not
        for stage in (f"layer{last}.query", f"layer{last}.attention", f"layer{last}.mlp", "logits"):
            assert kept[stage] == 0, stage
        # nor is anything below them: the top layer's keys and values were computed from it
        below = [s for s in graph.stage_order(cfg.n_layer) if s.startswith("embeddings") or s < f"layer{last}"]
        for stage in below + [f"layer{last}.key", f"layer{last}.value"]:
            assert kept[stage] == tp.stages[stage], stage
    # what each token leaves behind, beyond its cache entries, is what the cache references
    left = [sum(kept.values()) - 2 * cfg.n_layer * n for kept in trace.kept]
    assert np.diff([0] + trace.held_by_cache).tolist() == left
    if cfg.n_layer == 1:  # the embedding and the sums inside k and v: the same for every token
        assert left == [trace.passes[0].stages["embeddings"] + 2 * (linear_nodes(n, n) - n)] * len(tokens)
    want = [max(range(cfg.vocab_size), key=lambda i: l[i].data) for l in reference.sequence_logits(state, cfg, tokens)]
    assert trace.predictions == want


def test_inference_timeline_rises_and_falls_per_token():
    cfg = SMALL_CFG
    trace = graph.trace_inference(state_for(cfg), cfg, tokens_for(cfg, 3))
    created, alive = trace.tracker.timeline()
    assert created[-1] == sum(tp.built for tp in trace.passes)
    marks = {label: a for label, _, a in trace.tracker.marks}
    after = [marks[f"token {t}"] for t in range(3)]
    assert after == [c + h for c, h in zip(trace.cache_nodes, trace.held_by_cache)]
    # nothing dies while a token is built: each token peaks at what was left plus all it built
    assert max(alive) == max(left + tp.built for left, tp in zip([0] + after, trace.passes))
    assert alive[-1] == 0  # and when the sequence is done, its cache goes too


# --- attention weights ---


def _np_rmsnorm(x):
    return x * (np.mean(x * x) + 1e-5) ** -0.5


def test_attention_weights_are_the_engines_softmax():
    cfg = SMALL_CFG
    state = state_for(cfg, 3)
    tokens = tokens_for(cfg, 5)
    att = np.array(graph.attention_weights(state, cfg, tokens))
    T, K = len(tokens), cfg.n_embd // cfg.n_head
    assert att.shape == (cfg.n_layer, cfg.n_head, T, T)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=0, atol=1e-12)
    assert np.all(np.triu(att, 1) == 0)
    # layer 0 recomputed with numpy from the same weights
    W = {k: np.array([[v.data for v in row] for row in m]) for k, m in state.items()}
    x = np.stack([_np_rmsnorm(_np_rmsnorm(W["wte"][t] + W["wpe"][p])) for p, t in enumerate(tokens)])
    q, k = x @ W["layer0.attn_wq"].T, x @ W["layer0.attn_wk"].T
    for h in range(cfg.n_head):
        s = slice(h * K, (h + 1) * K)
        scores = q[:, s] @ k[:, s].T / math.sqrt(K)
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        want = np.exp(scores - scores.max(-1, keepdims=True))
        np.testing.assert_allclose(att[0, h], want / want.sum(-1, keepdims=True), rtol=1e-12, atol=1e-14)


def test_attention_is_uniform_without_queries():
    cfg = DEEP_CFG
    state = state_for(cfg)
    for name in ("layer0.attn_wq", "layer1.attn_wq"):
        for row in state[name]:
            for v in row:
                v.data = 0.0
    att = np.array(graph.attention_weights(state, cfg, tokens_for(cfg, 4)))
    want = np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None]
    np.testing.assert_allclose(att, np.broadcast_to(want, att.shape), rtol=1e-15)


# --- mermaid ---

_BOX = re.compile(r'^\s*(\w+)\["(.*)"\]$')
_DATA = re.compile(r'^\s*(\w+)\[\("(.*)"\)\]$')
_EDGE = re.compile(r'^\s*(\w+) -->(?:\|"(.*)"\|)? (\w+)$')


def parse_mermaid(text):
    """(boxes {id: label}, edges [(a, label, b)], classes {id: style}); checks the structure on the way."""
    lines = text.splitlines()
    assert lines[0] == "graph TD"
    boxes, edges, class_of, styles, depth, subgraphs = {}, [], {}, {}, 0, set()
    for line in lines[1:]:
        s = line.strip()
        if s.startswith("subgraph "):
            sid = s.split()[1]
            assert sid not in subgraphs and sid not in boxes
            subgraphs.add(sid)
            depth += 1
        elif s == "end":
            depth -= 1
            assert depth >= 0
        elif s == "direction TB":
            pass
        elif s.startswith("classDef "):
            _, name, style = s.split(" ", 2)
            styles[name] = style
        elif s.startswith("class "):
            _, ids, name = s.split(" ")
            for i in ids.split(","):
                assert i in boxes, i
                class_of[i] = name
        elif m := _BOX.match(s) or _DATA.match(s):
            assert m.group(1) not in boxes, m.group(1)
            assert '"' not in m.group(2)
            boxes[m.group(1)] = m.group(2)
        elif m := _EDGE.match(s):
            assert m.group(1) in boxes and m.group(3) in boxes, s
            edges.append((m.group(1), m.group(2), m.group(3)))
        else:
            raise AssertionError(f"unparsed mermaid line: {line!r}")
    assert depth == 0
    return boxes, edges, {i: styles[c] for i, c in class_of.items()}


def count_in(label):
    """The number just before the label's last "nodes"."""
    return int(re.findall(r"([\d,]+) nodes", label)[-1].replace(",", ""))


def test_to_mermaid_draws_the_token_with_its_counts_and_the_seeds_colours():
    cfg = SEED_CFG
    state = state_for(cfg)
    keys, values = graph.empty_cache(cfg)
    for pos in range(3):
        _, tp = graph.token_pass(state, cfg, pos, pos, keys, values)
    boxes, edges, style = parse_mermaid(graph.to_mermaid(tp))
    stage_boxes = {i: l for i, l in boxes.items() if i.startswith("T_")}
    assert sum(count_in(l) for l in stage_boxes.values()) == tp.built
    assert count_in(boxes["T_logits"]) == tp.stages["logits"]
    assert boxes["W_wte"].endswith("16 of 432 nodes read")
    assert "fill:#ff9900" in style["W_wte"] and "fill:#f9f" in style["T_layer0_query"]
    assert "fill:#ff9" in style["KV"] and count_in(boxes["KV"]) == 2 * 16 * 2
    edge_counts = {(a, b): int(label.replace(",", "")) for a, label, b in edges}
    assert edge_counts["W_lm_head", "T_logits"] == 27 * 16
    assert edge_counts["KV", "T_layer0_attention"] == 2 * 16 * 2
    assert sum(edge_counts.values()) == sum(tp.edges.values())

    # the first token has no cache to read: no KV box
    keys, values = graph.empty_cache(cfg)
    _, first = graph.token_pass(state, cfg, 0, 0, keys, values)
    assert "KV" not in parse_mermaid(graph.to_mermaid(first))[0]


def test_the_four_diagrams_carry_live_counts():
    cfg = SMALL_CFG
    state = state_for(cfg)
    tokens = tokens_for(cfg, 5)
    inference = graph.trace_inference(state, cfg, tokens)
    step = graph.trace_train_step(state, cfg, reference.Adam(reference.parameters(state), 5), 0, tokens)
    n_params = len(reference.parameters(state))

    boxes, _, style = parse_mermaid(graph.components_mermaid(state, inference.passes[0]))
    assert count_in(boxes["W_layer0_mlp_fc1"]) == 4 * 8 * 8
    assert sum(count_in(l) for i, l in boxes.items() if i.startswith("T_")) == inference.passes[0].built
    assert all("fill:#ff9900" in style[i] for i in boxes if i.startswith("W_"))

    boxes, _, style = parse_mermaid(graph.lifecycle_mermaid(step, inference))
    assert count_in(boxes["Build"]) == step.built and count_in(boxes["Destroy"]) == 0
    assert count_in(boxes["Hold"]) == step.held
    assert count_in(boxes["Held"]) == inference.held_by_cache[-1]
    assert "fill:#ff9" in style["K_history"] and "fill:#ff9" in style["V_history"]
    assert count_in(boxes["logits"]) == inference.passes[-1].stages["logits"]
    assert "fill:#add8e6" in style["Backward"]

    boxes, edges, style = parse_mermaid(graph.training_mermaid(step, n_params))
    assert count_in(boxes["W_in"]) == n_params and count_in(boxes["Graph"]) == step.built
    assert "fill:#add8e6" in style["Adam"] and "fill:#add8e6" in style["Gradients"]
    assert ("Adam", f"Update {step.weights_updated}", "W_in") in edges
    assert "Input" not in style  # data is unstyled, as in the seed


# --- the JAX side ---


def test_op_counts_counts_nested_programs_once():
    from microgpt_jax.graph import op_counts

    def f(x):
        y = jnp.sin(x) * 2.0
        carry, _ = jax.lax.scan(lambda c, xi: (c * xi + 1.0, None), 0.0, y)
        return jax.jit(jnp.cos)(carry)

    counts = op_counts(jax.make_jaxpr(f)(jnp.ones(5)))
    assert counts["sin"] == 1 and counts["cos"] == 1 and counts["scan"] == 1 and counts["jit"] == 1
    assert counts["mul"] == 2 and counts["add"] == 1  # one mul outside, one in the scan body run 5 times


def test_the_train_step_donates_params_and_opt_state():
    from microgpt_jax.graph import buffers
    from microgpt_jax.layout import padded_batch
    from microgpt_jax.model import GPTConfig, init_params
    from microgpt_jax.train import TrainConfig, Trainer

    cfg = GPTConfig(vocab_size=7, n_embd=8, n_head=2, n_layer=1, block_size=6)
    trainer = Trainer(cfg, TrainConfig(steps=3, dtype="float64"))
    params = init_params(cfg, jax.random.key(0), jnp.float64)
    state = trainer.init(params)  # TrainState(params, opt_state, step)
    batch = jax.tree.map(jnp.asarray, padded_batch([[6, 1, 2, 6]], cfg.block_size))
    rows = buffers(trainer.step, state, batch)
    n_params, n_opt = len(jax.tree.leaves(state.params)), len(jax.tree.leaves(state.opt_state))
    n_state = n_params + n_opt + 1  # and the step counter
    assert len(jax.tree.leaves(state)) == n_state
    assert len(rows) == n_state + 5
    assert [r.donated for r in rows] == [True] * n_state + [False] * 5
    assert [r.aliased_output for r in rows[:n_state]] == list(range(n_state))
    assert all(r.aliased_output is None for r in rows[n_state:])
    assert all(r.path.startswith("[0].params['") for r in rows[:n_params])
    assert all(r.path.startswith("[0].opt_state") for r in rows[n_params : n_params + n_opt])
    assert rows[n_state - 1].path == "[0].step" and rows[n_state - 1].aval == "int32[]"
    assert rows[-1].path == "[1].weights" and rows[-1].aval == "float64[1,6]"

    plain = buffers(jax.jit(lambda p: jax.tree.map(lambda w: 2 * w, p)), params)
    assert not any(r.donated or r.aliased_output is not None for r in plain)
