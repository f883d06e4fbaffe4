"""The scalar engine: every operation's value and gradient, against hand-derived
derivatives and central finite differences; and a deep graph's backward."""

import math
import sys

import pytest

from reference import Config, Value, init_state, loss, topological_order

H = 1e-6  # finite-difference step
FD_TOL = 1e-7  # central differences are accurate to about H^2 * f''' + eps / H


def grad_of(f, *xs):
    """(value, [d f / d x_i]) from the engine."""
    nodes = [Value(x) for x in xs]
    out = f(*nodes)
    out.backward()
    return out.data, [n.grad for n in nodes]


def finite_diff(f, *xs):
    """Central differences of f over plain floats (f evaluated through Values, then .data)."""
    grads = []
    for i in range(len(xs)):
        up = [Value(x + H * (j == i)) for j, x in enumerate(xs)]
        down = [Value(x - H * (j == i)) for j, x in enumerate(xs)]
        grads.append((f(*up).data - f(*down).data) / (2 * H))
    return grads


# (name, f, inputs, expected value, expected gradients by hand)
CASES = [
    ("add", lambda a, b: a + b, (1.5, -2.25), -0.75, [1.0, 1.0]),
    ("add const", lambda a: a + 3.0, (1.5,), 4.5, [1.0]),
    ("radd const", lambda a: 3.0 + a, (1.5,), 4.5, [1.0]),
    ("mul", lambda a, b: a * b, (1.5, -2.25), -3.375, [-2.25, 1.5]),
    ("rmul const", lambda a: 4.0 * a, (1.5,), 6.0, [4.0]),
    ("pow", lambda a: a**3, (1.5,), 3.375, [3 * 1.5**2]),
    ("pow negative", lambda a: a**-0.5, (2.0,), 2.0**-0.5, [-0.5 * 2.0**-1.5]),
    ("log", lambda a: a.log(), (2.5,), math.log(2.5), [1 / 2.5]),
    ("exp", lambda a: a.exp(), (0.7,), math.exp(0.7), [math.exp(0.7)]),
    ("relu positive", lambda a: a.relu(), (0.7,), 0.7, [1.0]),
    ("relu negative", lambda a: a.relu(), (-0.7,), 0.0, [0.0]),
    ("tanh", lambda a: a.tanh(), (0.7,), math.tanh(0.7), [1 - math.tanh(0.7) ** 2]),
    ("tanh negative", lambda a: a.tanh(), (-2.5,), math.tanh(-2.5), [1 - math.tanh(2.5) ** 2]),
    (
        "tanh composite",
        lambda a, b: (a * b).tanh() * b,
        (0.4, -1.3),
        math.tanh(-0.52) * -1.3,
        [(1 - math.tanh(0.52) ** 2) * 1.69, (1 - math.tanh(0.52) ** 2) * -0.52 + math.tanh(-0.52)],
    ),
    ("neg", lambda a: -a, (0.7,), -0.7, [-1.0]),
    ("sub", lambda a, b: a - b, (0.7, 0.2), 0.5, [1.0, -1.0]),
    ("rsub", lambda a: 1.0 - a, (0.7,), 0.3, [-1.0]),
    ("div", lambda a, b: a / b, (0.7, 0.2), 3.5, [1 / 0.2, -0.7 / 0.2**2]),
    ("rdiv", lambda a: 1.0 / a, (0.5,), 2.0, [-1 / 0.5**2]),
    # a node used twice: gradients from both uses add up
    ("reuse", lambda a: a * a + a, (3.0,), 12.0, [7.0]),
    ("composite", lambda a, b: (a * b).exp().log() / b, (0.3, 1.7), 0.3, [1.0, 0.0]),
]


@pytest.mark.parametrize("name,f,xs,value,hand", CASES, ids=[c[0] for c in CASES])
def test_value_and_gradient(name, f, xs, value, hand):
    got_value, got_grads = grad_of(f, *xs)
    assert got_value == pytest.approx(value, rel=1e-14, abs=1e-15)
    assert got_grads == pytest.approx(hand, rel=1e-12, abs=1e-15)
    if name != "relu negative":  # (finite differences agree there too; 0 either side)
        assert got_grads == pytest.approx(finite_diff(f, *xs), abs=FD_TOL)


def test_relu_kink_follows_the_spec():
    # relu's local derivative is 1 where the input is > 0, else 0: at exactly 0 it is 0.
    _, (g,) = grad_of(lambda a: a.relu(), 0.0)
    assert g == 0.0


def test_gradient_is_seeded_by_backward_not_accumulated_twice():
    a = Value(2.0)
    out = a * 3.0
    out.backward()
    assert (out.grad, a.grad) == (1, 3.0)


def test_topological_order_puts_children_first():
    a, b = Value(1.0), Value(2.0)
    c = a * b
    d = c + a
    order = topological_order(d)
    pos = {id(n): i for i, n in enumerate(order)}
    for node in order:
        for child in node._children:
            assert pos[id(child)] < pos[id(node)]
    assert len(order) == len({id(n) for n in order}) == 4


def graph_depth(root):
    """Longest path from root to a leaf, computed without recursion."""
    depth = {}
    for node in topological_order(root):
        depth[id(node)] = 1 + max((depth[id(c)] for c in node._children), default=0)
    return depth[id(root)]


def test_deep_graph_backward_needs_no_recursion():
    import random

    cfg = Config(vocab_size=5, n_embd=4, n_head=2, n_layer=4, block_size=64)
    state = init_state(cfg, random.Random(0))
    tokens = [4] + [i % 4 for i in range(70)] + [4]  # longer than block_size: cut to 64
    out = loss(state, cfg, tokens)
    limit = 200
    assert graph_depth(out) > 3 * limit  # a recursive walk would need a frame per level
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(limit)
    try:
        out.backward()
    finally:
        sys.setrecursionlimit(old)
    grads = [abs(v.grad) for row in state["layer0.attn_wq"] for v in row]
    assert max(grads) > 0
