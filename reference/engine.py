"""A scalar autograd engine: every number is a node in a define-by-run graph.

Each node holds its value, its gradient (0 until backward), its children and
the local derivative of itself with respect to each child. That is all
backpropagation needs: the chain rule, applied in reverse topological order.

This is the seed's engine to the last bit (spec section 7): the same
primitives, and backward walks the same topological order as the seed's
recursive build_topo, only without recursion.
"""

import math


class Value:
    __slots__ = ("data", "grad", "_children", "_local_grads", "_op", "__weakref__")

    def __init__(self, data, children=(), local_grads=(), op=""):
        self.data = data
        self.grad = 0
        self._children = children
        self._local_grads = local_grads
        self._op = op  # which operation made this node ('' for a leaf); for graph statistics

    # The primitive operations: each returns a new node with its local derivatives.
    def __add__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data + other.data, (self, other), (1, 1), "+")

    def __mul__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data * other.data, (self, other), (other.data, self.data), "*")

    def __pow__(self, k):
        # power by a constant only: d(x^k)/dx = k x^(k-1)
        return Value(self.data**k, (self,), (k * self.data ** (k - 1),), "**")

    def log(self):
        return Value(math.log(self.data), (self,), (1 / self.data,), "log")

    def exp(self):
        e = math.exp(self.data)
        return Value(e, (self,), (e,), "exp")

    def relu(self):
        return Value(max(0.0, self.data), (self,), (float(self.data > 0),), "relu")

    def tanh(self):
        # not in the seed: gelu and the logit softcap need it. d tanh(x)/dx = 1 - tanh(x)^2
        t = math.tanh(self.data)
        return Value(t, (self,), (1 - t * t,), "tanh")

    def erf(self):
        # not in the seed: the exact gelu needs it. d erf(x)/dx = 2 / sqrt(pi) exp(-x^2)
        return Value(math.erf(self.data), (self,), (2 / math.sqrt(math.pi) * math.exp(-self.data * self.data),), "erf")

    # Everything else is built from the primitives, as the spec says.
    def __neg__(self):
        return self * -1

    def __radd__(self, other):
        return self + other

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return other + (-self)

    def __rmul__(self, other):
        return self * other

    def __truediv__(self, other):
        return self * other**-1

    def __rtruediv__(self, other):
        return other * self**-1

    def __repr__(self):
        return f"Value(data={self.data}, grad={self.grad})"

    def backward(self):
        """Set d(self)/d(self) = 1 and push gradients to every node below, in reverse topological order."""
        self.grad = 1
        for v in reversed(topological_order(self)):
            for child, local_grad in zip(v._children, v._local_grads):
                child.grad += local_grad * v.grad


def topological_order(root):
    """Every node reachable from root, each after all of its children: the seed's order exactly.

    The seed's build_topo(v) is recursive: if v is new, mark it, recurse into
    each child in order, then append v. This is the same walk with an explicit
    stack of (node, iterator over its remaining children), so a deep graph
    (many layers, long sequences) cannot hit Python's recursion limit. The
    order matters to the last bit: gradients add up in it (spec section 7).
    """
    order, visited = [], {id(root)}
    stack = [(root, iter(root._children))]
    while stack:
        node, children = stack[-1]
        for child in children:
            if id(child) not in visited:  # descend into the first unvisited child, resume here later
                visited.add(id(child))
                stack.append((child, iter(child._children)))
                break
        else:  # every child done: the node's recursive call would return now
            stack.pop()
            order.append(node)
    return order
