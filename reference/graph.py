"""The scalar engine's define-by-run graph, measured on live objects.

../shared/spec/computation-graph.md tells microgpt's story with hand-drawn
diagrams: permanent weights, temporary values built for one token, training
(build the sequence's graph, hold it, backward, update, destroy) against
inference (build one token's graph, predict, keep only the KV cache). This
module counts that story on the real nodes and draws the same four diagrams,
in the same colours, with the counts on the boxes.

Nothing here changes the engine or the model:
- a node's role comes from membership: a weight is a node of the state dict,
  a constant a leaf that is not, a temporary anything an operation built;
- a node's stage comes from the weights it depends on: it belongs to the
  last weight matrix on its path in forward order (so q, which depends on
  attn_wq alone among q/k/v weights, is "query", and q.k, which depends on
  attn_wq and attn_wk, is "attention"; a norm counts with the stage that
  produced its input);
- lifetimes come from weak references (`Value` has `__weakref__`) to every
  node built inside `tracking()`;
- per-call records (one entry per `gpt` or `softmax` call) come from
  wrapping those functions of `reference.gpt` for the length of a `with`.
"""

import importlib
import weakref
from array import array
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

from reference.engine import Value, topological_order
from reference.gpt import empty_cache, entries, loss, parameters

# `reference.gpt` the attribute is the function gpt(); the module is needed to wrap its functions.
_gpt_module = importlib.import_module("reference.gpt")

WEIGHT, CONSTANT, TEMPORARY, KV_CACHE, OPTIMIZER = "weight", "constant", "temporary", "kv cache", "optimizer"

# The colours of computation-graph.md: weights orange, temporaries pink, KV cache yellow, optimizer blue.
STYLES = {
    WEIGHT: "fill:#ff9900,stroke:#333,stroke-width:2px,color:#000",
    TEMPORARY: "fill:#f9f,stroke:#333,color:#000",
    KV_CACHE: "fill:#ff9,stroke:#333,color:#000",
    OPTIMIZER: "fill:#add8e6,stroke:#333,color:#000",
}


# --- the graph: nodes, roles, statistics ---


class _Roots:
    """A stand-in parent for several roots, so topological_order can walk them all (not a Value: never counted)."""

    __slots__ = ("_children",)

    def __init__(self, roots):
        self._children = tuple(roots)


def nodes_of(roots):
    """Every node reachable from roots (a Value or an iterable of them), each after its children."""
    roots = (roots,) if isinstance(roots, Value) else roots
    return topological_order(_Roots(roots))[:-1]


def role_of(node, weight_ids):
    if id(node) in weight_ids:
        return WEIGHT
    return TEMPORARY if node._children else CONSTANT


@dataclass(frozen=True)
class GraphStats:
    """Counts of the graph below some roots: what backward would walk."""

    nodes: int
    edges: int
    depth: int  # the longest path, in edges, from a root down to a leaf
    by_role: dict  # weight / constant / temporary -> nodes
    by_op: dict  # '+', '*', '**', 'log', 'exp', 'relu', or 'leaf' -> nodes


def _depth(order):
    """The longest path, in edges, from any node of order (children first) down to a leaf."""
    depth = {}
    for v in order:
        depth[id(v)] = 1 + max((depth[id(c)] for c in v._children), default=-1)
    return max(depth.values(), default=0)


def graph_stats(roots, state) -> GraphStats:
    order = nodes_of(roots)
    weight_ids = {id(p) for p in parameters(state)}
    return GraphStats(
        nodes=len(order),
        edges=sum(len(v._children) for v in order),
        depth=_depth(order),
        by_role=dict(Counter(role_of(v, weight_ids) for v in order)),
        by_op=dict(Counter(v._op or "leaf" for v in order)),
    )


# --- stages: which part of a token's pass built a node ---


def forward_matrices(names):
    """Weight matrix names (a state dict's keys) in the order a token's pass uses them: lm_head last."""
    return [name for name in names if name != "lm_head"] + ["lm_head"]


def stage_order(n_layer):
    """Stage names in forward order."""
    per_layer = ("query", "key", "value", "attention", "mlp")
    return ["embeddings"] + [f"layer{i}.{s}" for i in range(n_layer) for s in per_layer] + ["logits"]


_QKV = {"attn_wq": "query", "attn_wk": "key", "attn_wv": "value"}


def _stage(mask, matrices):
    """The stage of a node that depends on the weight matrices whose bits are set in mask."""
    if not mask:
        return "other"
    name = matrices[mask.bit_length() - 1]  # the last matrix in forward order
    if name in ("wte", "wpe"):
        return "embeddings"
    if name == "lm_head":
        return "logits"
    layer, kind = name.split(".")
    if kind in _QKV:
        # q, k and v each depend on one of the three; attention scores and outputs on two or three
        qkv_bits = sum(mask >> matrices.index(f"{layer}.{w}") & 1 for w in _QKV)
        return f"{layer}.{_QKV[kind]}" if qkv_bits == 1 else f"{layer}.attention"
    return f"{layer}.attention" if kind == "attn_wo" else f"{layer}.mlp"


def stages_of(order, state):
    """id(node) -> stage, for every non-weight node of order (children before parents).

    A constant takes the stage of the operation that wrapped it.
    """
    matrices = forward_matrices(state)
    bit = {id(p): 1 << i for i, name in enumerate(matrices) for p in entries(state[name])}
    mask, stage = {}, {}
    for v in order:
        m = bit.get(id(v), 0)
        for c in v._children:
            m |= mask[id(c)]
        mask[id(v)] = m
        if v._children:
            stage[id(v)] = _stage(m, matrices)
            for c in v._children:
                if not c._children and id(c) not in bit:
                    stage.setdefault(id(c), stage[id(v)])
    return stage


def weight_matrix_of(state):
    """id(weight node) -> the name of its matrix."""
    return {id(p): name for name, matrix in state.items() for p in entries(matrix)}


# --- one token's pass ---


@dataclass
class TokenPass:
    """What one call of gpt() built, measured.

    `nodes` holds weak references to the nodes this token built, by stage,
    so their lifetimes can be checked after the caller drops the logits.
    """

    token: int
    position: int
    stages: dict  # stage -> nodes built (temporaries and the constants they wrapped)
    roles: dict  # constant / temporary -> nodes built; weight / kv cache -> nodes read
    ops: dict  # operation -> temporaries built
    depth: int  # longest path from a logit or a new cache entry down to a leaf
    weights_read: dict  # matrix -> (its nodes this token read, its nodes)
    edges: dict  # (source, stage) -> scalar edges; a source is a matrix, "kv cache" or a stage
    cache_after: list  # per layer: cached (keys, values) after this token
    nodes: dict = field(repr=False)  # stage -> [weakref to node]

    @property
    def built(self):
        return sum(self.stages.values())

    def alive(self):
        """stage -> how many of this token's nodes are still alive."""
        return {s: sum(r() is not None for r in refs) for s, refs in self.nodes.items()}


def token_pass(state, cfg, token, pos, keys, values):
    """Run gpt() for one token, appending to the cache; returns (logits, TokenPass)."""
    past = [x for cache in (keys, values) for layer in cache for vec in layer for x in vec]
    past_entries = {id(x) for x in past}
    before = {id(v) for v in nodes_of(past)}  # the cache and the graph behind it: not this token's
    logits = _gpt_module.gpt(state, cfg, token, pos, keys, values)
    new_entries = [x for cache in (keys, values) for layer in cache for x in layer[-1]]
    order = nodes_of(logits + new_entries)
    matrix = weight_matrix_of(state)
    stage = stages_of(order, state)
    built = [v for v in order if id(v) not in before and id(v) not in matrix]

    edges, read = Counter(), {}
    for v in built:
        for c in v._children:
            if id(c) in matrix:
                source = matrix[id(c)]
                read[id(c)] = source
            elif id(c) in past_entries:
                source = KV_CACHE
            else:
                source = stage[id(c)]
            if source != stage[id(v)]:
                edges[source, stage[id(v)]] += 1
    nodes = {}
    for v in built:
        nodes.setdefault(stage[id(v)], []).append(weakref.ref(v))
    reads_per_matrix = Counter(read.values())
    roles = Counter(TEMPORARY if v._children else CONSTANT for v in built)
    roles[WEIGHT] = len(read)
    roles[KV_CACHE] = len({id(c) for v in built for c in v._children if id(c) in past_entries})
    return logits, TokenPass(
        token=token,
        position=pos,
        stages={s: len(refs) for s, refs in nodes.items()},
        roles=dict(roles),
        ops=dict(Counter(v._op for v in built if v._children)),
        depth=_depth(order),
        weights_read={name: (reads_per_matrix[name], len(state[name]) * len(state[name][0])) for name in state},
        edges=dict(edges),
        cache_after=[(len(keys[i]), len(values[i])) for i in range(cfg.n_layer)],
        nodes=nodes,
    )


# --- lifetimes ---


class Tracker:
    """Counts the nodes built inside `tracking()` and, through weak references, those still alive.

    `created` and `alive` are the counts now; `timeline()` gives both after
    every birth and death, `marks` the counts at points named by mark().
    """

    def __init__(self):
        self.created = self.alive = 0
        self._refs = set()
        self._created_at, self._alive_at = array("q"), array("q")
        self.marks = []

    def _record(self):
        self._created_at.append(self.created)
        self._alive_at.append(self.alive)

    def _born(self, node):
        self.created += 1
        self.alive += 1
        self._refs.add(weakref.ref(node, self._died))
        self._record()

    def _died(self, ref):
        self.alive -= 1
        self._refs.discard(ref)
        self._record()

    def mark(self, label):
        self.marks.append((label, self.created, self.alive))

    def alive_nodes(self):
        return [v for v in (r() for r in self._refs) if v is not None]

    def timeline(self):
        """(nodes built so far, nodes alive) after every birth and every death."""
        return list(self._created_at), list(self._alive_at)


@contextmanager
def tracking():
    """Track every Value built inside the block (the weights built before it are not tracked)."""
    tracker = Tracker()
    init = Value.__init__

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        tracker._born(self)

    Value.__init__ = tracked_init
    try:
        yield tracker
    finally:
        Value.__init__ = init


@contextmanager
def _wrapped(name, wrapper):
    """Replace reference.gpt's function `name` by wrapper(original) inside the block."""
    original = getattr(_gpt_module, name)
    setattr(_gpt_module, name, wrapper(original))
    try:
        yield
    finally:
        setattr(_gpt_module, name, original)


@dataclass
class StepTrace:
    """One training step of the scalar engine, measured."""

    loss: float
    positions: int
    built: int  # nodes the step built
    built_per_token: list  # nodes each gpt() call built
    held: int  # nodes alive once the loss is built, held through backward and the update
    logits: int  # logit nodes (positions x vocabulary)
    graph: GraphStats  # the loss's graph: what backward walks
    grads_nonzero: int  # weights whose gradient was not 0
    weights_updated: int  # weights whose value Adam changed
    alive_after: int  # nodes of the step still alive after it
    tracker: Tracker = field(repr=False)


def trace_train_step(state, cfg, adam, step, tokens) -> StepTrace:
    """reference.train_step, phase by phase: build and hold, backward, update, destroy."""
    per_token, n_logits = [], []
    with tracking() as tracker:

        def counted(gpt):
            def call(*args):
                start = tracker.created
                logits = gpt(*args)
                per_token.append(tracker.created - start)
                n_logits.append(len(logits))
                tracker.mark(f"token {len(per_token) - 1}")
                return logits

            return call

        with _wrapped("gpt", counted):
            step_loss = loss(state, cfg, tokens)
        tracker.mark("built")
        held = tracker.alive
        stats = graph_stats(step_loss, state)
        step_loss.backward()
        tracker.mark("backward")
        params = parameters(state)
        grads_nonzero = sum(p.grad != 0 for p in params)
        before = [p.data for p in params]
        adam.step(step)
        tracker.mark("update")
        value = step_loss.data
        del step_loss  # the only reference to the graph: every temporary goes with it
        tracker.mark("destroyed")
    return StepTrace(
        loss=value,
        positions=len(per_token),
        built=tracker.created,
        built_per_token=per_token,
        held=held,
        logits=sum(n_logits),
        graph=stats,
        grads_nonzero=grads_nonzero,
        weights_updated=sum(p.data != b for p, b in zip(params, before)),
        alive_after=tracker.alive,
        tracker=tracker,
    )


@dataclass
class InferenceTrace:
    """Token-by-token inference on the scalar engine, measured after each token is dropped."""

    passes: list  # TokenPass per token
    predictions: list  # the most likely next token after each token
    cache_nodes: list  # key and value nodes in the cache
    held_by_cache: list  # other nodes alive only because a cached key or value references them
    other_alive: list  # every other node built so far and still alive
    kept: list  # per token, stage -> its nodes still alive once it is dropped
    tracker: Tracker = field(repr=False)


def trace_inference(state, cfg, tokens) -> InferenceTrace:
    """Feed tokens one at a time with a KV cache; after each, drop its logits and see what is left.

    Each cached key and value is a node that still references the nodes it
    was computed from (its children), so the cache keeps that part of the
    graph alive too: `held_by_cache` counts it.
    """
    keys, values = empty_cache(cfg)
    trace = InferenceTrace(passes=[], predictions=[], cache_nodes=[], held_by_cache=[], other_alive=[], kept=[], tracker=None)
    with tracking() as tracker:
        for pos, token in enumerate(tokens):
            logits, tp = token_pass(state, cfg, token, pos, keys, values)
            trace.predictions.append(max(range(len(logits)), key=lambda i, row=logits: row[i].data))
            del logits  # predicted: everything not reachable from the cache goes now
            tracker.mark(f"token {pos}")
            entries = [x for cache in (keys, values) for layer in cache for vec in layer for x in vec]
            kept = {id(v) for v in nodes_of(entries)}
            alive = tracker.alive_nodes()
            n_kept = sum(id(v) in kept for v in alive)
            trace.passes.append(tp)
            trace.kept.append(tp.alive())
            trace.cache_nodes.append(len(entries))
            trace.held_by_cache.append(n_kept - len(entries))
            trace.other_alive.append(len(alive) - n_kept)
            del alive, entries
    trace.tracker = tracker
    return trace


def attention_weights(state, cfg, tokens):
    """Each head's attention weights over a sequence: [layer][head][t][s], 0 where s > t.

    Read off the softmax calls of the very gpt() the engine runs.
    """
    calls = []

    def recorded(softmax):
        def call(logits):
            probs = softmax(logits)
            calls.append([p.data for p in probs])
            return probs

        return call

    keys, values = empty_cache(cfg)
    with _wrapped("softmax", recorded):
        for pos, token in enumerate(tokens):
            _gpt_module.gpt(state, cfg, token, pos, keys, values)
    T, H = len(tokens), cfg.n_head
    out = [[[[0.0] * T for _ in range(T)] for _ in range(H)] for _ in range(cfg.n_layer)]
    for i, w in enumerate(calls):  # in call order: position, then layer, then head
        t, rest = divmod(i, cfg.n_layer * H)
        layer, head = divmod(rest, H)
        out[layer][head][t][: len(w)] = w
    return out


# --- mermaid, in computation-graph.md's colours ---


class _Mermaid:
    def __init__(self):
        self.lines, self.roles = ["graph TD"], {}

    def box(self, node_id, label, role):
        self.lines.append(f'    {node_id}["{label}"]')
        self.roles.setdefault(role, []).append(node_id)

    def data(self, node_id, label):
        """Input or target data: microgpt's cylinder, unstyled."""
        self.lines.append(f'    {node_id}[("{label}")]')

    @contextmanager
    def subgraph(self, node_id, title):
        self.lines += [f'    subgraph {node_id} ["{title}"]', "    direction TB"]
        yield
        self.lines.append("    end")

    def edge(self, a, b, label=None):
        self.lines.append(f'    {a} -->|"{label}"| {b}' if label is not None else f"    {a} --> {b}")

    def text(self):
        lines = list(self.lines)
        for role, ids in self.roles.items():
            lines.append(f"    classDef {_node_id(role)} {STYLES[role]}")
            lines.append(f"    class {','.join(ids)} {_node_id(role)}")
        return "\n".join(lines)


def _node_id(name):
    return "".join(c if c.isalnum() else "_" for c in name)


def _n(count):
    return f"{count:,}"


def stage_label(stage):
    """'layer0.query' -> 'query (layer 0)'."""
    if "." not in stage:
        return stage
    layer, name = stage.split(".")
    return f"{name} (layer {layer[len('layer') :]})"


def components_mermaid(state, tp: TokenPass):
    """Diagram 1: every weight matrix (permanent) and what one token's pass builds (temporary)."""
    m = _Mermaid()
    with m.subgraph("Permanent_Memory", "PERMANENT MEMORY (weights)"):
        for name in forward_matrices(state):
            rows, cols = len(state[name]), len(state[name][0])
            m.box("W_" + _node_id(name), f"{name}<br/>{rows}x{cols} = {_n(rows * cols)} nodes", WEIGHT)
    with m.subgraph("Temporary_Graph", f"TEMPORARY GRAPH (token at position {tp.position})"):
        for s in stage_order(len(tp.cache_after)):
            if s in tp.stages:
                m.box("T_" + _node_id(s), f"{stage_label(s)}<br/>{_n(tp.stages[s])} nodes", TEMPORARY)
    return m.text()


def to_mermaid(tp: TokenPass):
    """Diagram 2: one token's pass, the weights it reads linked to the temporaries it builds.

    Boxes are grouped by role (weights, KV cache, this token's temporaries)
    and by stage; every box carries its node count, every arrow the number
    of scalar edges from one box into the other.
    """
    m = _Mermaid()
    with m.subgraph("Weights", "PERMANENT WEIGHTS (read by this token)"):
        for name in forward_matrices(tp.weights_read):
            read, total = tp.weights_read[name]
            if read:
                m.box("W_" + _node_id(name), f"{name}<br/>{_n(read)} of {_n(total)} nodes read", WEIGHT)
    if tp.roles.get(KV_CACHE):
        with m.subgraph("KV_Cache", "KV CACHE (earlier tokens)"):
            m.box("KV", f"past keys and values<br/>{_n(tp.roles[KV_CACHE])} nodes read", KV_CACHE)
    with m.subgraph("Temporary", f"TEMPORARY VALUES (token {tp.token} at position {tp.position})"):
        for s in stage_order(len(tp.cache_after)):
            if s in tp.stages:
                m.box("T_" + _node_id(s), f"{stage_label(s)}<br/>{_n(tp.stages[s])} nodes", TEMPORARY)
    for (source, stage), count in tp.edges.items():
        if source == KV_CACHE:
            a = "KV"
        elif source in tp.weights_read:
            a = "W_" + _node_id(source)
        else:
            a = "T_" + _node_id(source)
        m.edge(a, "T_" + _node_id(stage), _n(count))
    return m.text()


def lifecycle_mermaid(step: StepTrace, inference: InferenceTrace):
    """Diagram 3: training holds the whole step's graph then frees it; inference keeps only the cache."""
    m = _Mermaid()
    with m.subgraph("Training", f"TRAINING: one step, {step.positions} tokens"):
        m.box("Build", f"1. build<br/>{_n(step.built)} nodes", TEMPORARY)
        m.box("Hold", f"2. hold<br/>{_n(step.held)} nodes alive", TEMPORARY)
        m.box("Backward", f"3. backward<br/>{_n(step.graph.edges)} edges, depth {_n(step.graph.depth)}", OPTIMIZER)
        m.box("Update", f"4. update<br/>{_n(step.weights_updated)} weights", WEIGHT)
        m.box("Destroy", f"5. destroy<br/>{_n(step.alive_after)} nodes left alive", TEMPORARY)
    for a, b in (("Build", "Hold"), ("Hold", "Backward"), ("Backward", "Update"), ("Update", "Destroy")):
        m.edge(a, b)

    last = inference.passes[-1]
    n_keys = sum(k for k, _ in last.cache_after)
    n_values = sum(v for _, v in last.cache_after)
    width = inference.cache_nodes[-1] // max(n_keys + n_values, 1)
    freed = {s: last.stages[s] - n for s, n in inference.kept[-1].items()}
    queries = sum(n for s, n in freed.items() if s.endswith(".query"))
    hidden = sum(freed.values()) - queries - freed["logits"]
    with m.subgraph("KV_Cache", f"KV CACHE after {len(inference.passes)} tokens (preserved)"):
        m.box("K_history", f"past keys<br/>{n_keys} vectors x {width} = {_n(n_keys * width)} nodes", KV_CACHE)
        m.box("V_history", f"past values<br/>{n_values} vectors x {width} = {_n(n_values * width)} nodes", KV_CACHE)
        m.box("Held", f"the graph they were computed from<br/>{_n(inference.held_by_cache[-1])} nodes", TEMPORARY)
    with m.subgraph("Trash_Bin", f"GARBAGE COLLECTED (token at position {last.position})"):
        m.box("q_vec", f"query vectors<br/>{_n(queries)} nodes", TEMPORARY)
        m.box("x_vec", f"hidden states<br/>{_n(hidden)} nodes", TEMPORARY)
        m.box("logits", f"logits<br/>{_n(freed['logits'])} nodes", TEMPORARY)
    m.edge("Held", "K_history")
    m.edge("Held", "V_history")
    return m.text()


def training_mermaid(step: StepTrace, n_params: int):
    """Diagram 4: weights, forward, loss, backward, Adam, and back to the weights."""
    m = _Mermaid()
    with m.subgraph("Weights", "1. PERMANENT MEMORY"):
        m.box("W_in", f"weights<br/>{_n(n_params)} nodes", WEIGHT)
    with m.subgraph("Forward", "2. FORWARD PASS"):
        m.data("Input", f"input data<br/>{step.positions} tokens")
        m.box("Graph", f"dynamic graph<br/>{_n(step.built)} nodes built", TEMPORARY)
        m.box("Output", f"prediction<br/>{_n(step.logits)} logits", TEMPORARY)
    with m.subgraph("Loss_Calc", "3. LOSS CALCULATION"):
        m.data("Target", f"target data<br/>{step.positions} tokens")
        m.box("Loss", f"loss value<br/>{step.loss:.4f}, depth {_n(step.graph.depth)}", TEMPORARY)
    with m.subgraph("Backward", "4. BACKWARD PASS"):
        m.box("Gradients", f"gradients (.grad)<br/>{_n(step.grads_nonzero)} of {_n(n_params)} nonzero", OPTIMIZER)
    with m.subgraph("Optimizer", "5. OPTIMIZATION"):
        m.box("Adam", f"Adam<br/>m and v: {_n(2 * n_params)} floats", OPTIMIZER)
    m.edge("Input", "Graph", "Combine")
    m.edge("W_in", "Graph", "Used By")
    m.edge("Graph", "Output", "Produces")
    m.edge("Output", "Loss", "Compare")
    m.edge("Target", "Loss", "Compare")
    m.edge("Loss", "Gradients", f"{_n(step.graph.edges)} edges")
    m.edge("Gradients", "Adam", "Input")
    m.edge("Adam", "W_in", f"Update {_n(step.weights_updated)}")
    return m.text()
