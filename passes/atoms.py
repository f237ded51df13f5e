"""Channel atoms and tensor layouts.

A tensor's *layout* is an integer numpy array with the tensor's ndim whose extents are
either 1 or the tensor's own extent; it broadcasts to the tensor's shape and gives each
element the atom (channel identity) it belongs to. A conv output of 64 channels has a
layout of shape ``(1, 64, 1, 1)``; a flattened ``(N, 64*4*4)`` tensor repeats each atom
16 times. Two sentinels:

- ``NONE`` (-1): no channel identity (a scalar, a reduction over channels); it combines
  with anything and constrains nothing.
- ``UNKNOWN`` (-2): channels the analysis cannot follow; whatever atom it meets is frozen.

Example::

    table = AtomTable()
    a = table.new("conv1", 4, kind="conv")   # array([0, 1, 2, 3])
    table.unify(a, table.new("conv2", 4, kind="conv"))
    table.find(a)                            # the class of each atom: array([0, 1, 2, 3])
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NONE = -1
UNKNOWN = -2


@dataclass
class Owner:
    """Something that owns atoms: a layer, a parameter, a model input, a constant."""

    name: str
    kind: str          # conv, linear, norm, param, input, const, ...
    order: int         # graph order of its first use
    atoms: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


class AtomTable:
    """Atoms, who owns them, their couplings, frozen reasons and tags.

    Couplings are recorded as edges during the walk and resolved into classes once, by
    vectorised label propagation (``roots``), so the walk never pays for union-find.
    """

    def __init__(self):
        self.owner_of: list[int] = []
        self.owners: list[Owner] = []
        self.owner_index: dict[str, int] = {}
        self.frozen: dict[int, str] = {}
        self.tags: list[tuple[str, np.ndarray]] = []
        self._edges: list[np.ndarray] = []
        self._roots: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.owner_of)

    def owner(self, key: str, kind: str, width: int) -> tuple[np.ndarray, bool]:
        """The atoms owned by ``key`` (created on first use); the flag says they are new."""
        idx = self.owner_index.get(key)
        if idx is not None and len(self.owners[idx].atoms) == width:
            return self.owners[idx].atoms, False
        if idx is not None:
            key = f"{key}#{len(self.owners)}"
        return self.new(key, width, kind), True

    def new(self, name: str, width: int, kind: str) -> np.ndarray:
        start = len(self.owner_of)
        atoms = np.arange(start, start + width, dtype=np.int64)
        idx = len(self.owners)
        self.owners.append(Owner(name, kind, idx, atoms))
        self.owner_index.setdefault(name, idx)
        self.owner_of.extend([idx] * width)
        self._roots = None
        return atoms

    def unify(self, a: np.ndarray, b: np.ndarray, reason: str = "") -> np.ndarray:
        """Unify two layouts element by element (broadcasting); returns the combined layout.

        Where an atom meets ``UNKNOWN`` it is frozen with ``reason``.
        """
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            a, b = np.broadcast_arrays(a, b)
        a_ok, b_ok = a >= 0, b >= 0
        both = a_ok & b_ok & (a != b)
        if both.any():
            self._edges.append(np.stack([a[both], b[both]], 1))
            self._roots = None
        if a_ok.all() and b_ok.all():  # the common case: two channel vectors, nothing unknown
            return a.astype(np.int64, copy=True)
        for mine, other in ((a, b), (b, a)):
            hit = (mine >= 0) & (other == UNKNOWN)
            if hit.any():
                self.freeze(mine[hit], reason or "combined with a tensor of unknown channels")
        unknown = (a == UNKNOWN) | (b == UNKNOWN)
        return np.where(a >= 0, a, np.where(b >= 0, b, np.where(unknown, UNKNOWN, NONE))).astype(np.int64)

    def freeze(self, atoms, reason: str) -> None:
        for x in np.unique(np.asarray(atoms)).tolist():
            if x >= 0 and x not in self.frozen:
                self.frozen[x] = reason

    def tag(self, atoms, tag: str) -> None:
        atoms = np.asarray(atoms).reshape(-1)
        self.tags.append((tag, atoms[atoms >= 0]))

    @property
    def roots(self) -> np.ndarray:
        """Class of every atom: the smallest atom it is coupled to."""
        if self._roots is None:
            labels = np.arange(len(self.owner_of), dtype=np.int64)
            if self._edges:
                e = np.concatenate(self._edges)
                a, b = e[:, 0], e[:, 1]
                while True:
                    lo = np.minimum(labels[a], labels[b])
                    new = labels.copy()
                    np.minimum.at(new, a, lo)
                    np.minimum.at(new, b, lo)
                    new = new[new]  # pointer jumping
                    if np.array_equal(new, labels):
                        break
                    labels = new
            self._roots = labels
        return self._roots

    def find(self, atoms) -> np.ndarray:
        """Class of each atom; sentinels map to themselves."""
        atoms = np.asarray(atoms, dtype=np.int64)
        return np.where(atoms >= 0, self.roots[np.maximum(atoms, 0)], atoms)


# ----------------------------------------------------------------------------- layouts

def trivial(layout: np.ndarray) -> bool:
    """True when the layout carries no channel atoms at all."""
    return bool((layout < 0).all())


def carrying_axes(layout: np.ndarray) -> list[int]:
    """Axes along which the layout varies (its channel axes)."""
    return [d for d in range(layout.ndim) if layout.shape[d] > 1]


def known_grid(layout: np.ndarray) -> bool:
    """A grid of channel blocks: channels on several axes (a (heads, dim) or (3, heads, dim)
    view of one projection), every position a known channel."""
    return len(carrying_axes(layout)) > 1 and bool((layout >= 0).all())


def fixed_extent(layout: np.ndarray, shape: tuple, axes) -> bool:
    """True when a tensor of ``shape`` has no channels (layout extent 1) on one of ``axes``
    (where other tensors carry channels) but a real extent there: its size on that axis is
    fixed, so the channels it meets there must keep theirs. A broadcast operand (extent 1 in
    its value too) is not fixed."""
    layout = layout.reshape((1,) * (len(shape) - layout.ndim) + layout.shape)
    return any(layout.shape[d] == 1 and shape[d] > 1 for d in axes)


def along(layout: np.ndarray, axis: int, extent: int) -> np.ndarray | None:
    """The 1-D atoms along ``axis`` (broadcast to ``extent``), or None when the layout
    also varies along another axis (then no single channel axis exists)."""
    axis = axis % layout.ndim
    if any(layout.shape[d] > 1 for d in range(layout.ndim) if d != axis):
        return None
    vec = layout.reshape(-1) if layout.size > 1 else np.full(1, layout.reshape(-1)[0])
    return np.broadcast_to(vec, (extent,)).copy() if vec.size != extent else vec.copy()


def unique_ints(values: np.ndarray, return_index: bool = False):
    """``np.unique`` for integer arrays by sorting (numpy 2's hash-based unique is about 8x
    slower on the 10^3-10^5 atom arrays the analysis sorts). With ``return_index``: also
    the index of each value's first occurrence."""
    values = np.asarray(values).reshape(-1)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return (ordered[first], order[first]) if return_index else ordered[first]


def fixed(atoms: np.ndarray) -> np.ndarray:
    """``atoms`` with NONE entries (an axis no prunable channel reaches, so its extent is
    fixed) as UNKNOWN: atoms a channel-wise op ties to them position by position (a BN's
    parameters, a depthwise conv's filters) must keep their extent too, so unifying with
    the result freezes them."""
    return np.where(atoms == NONE, UNKNOWN, atoms)


def on_axis(atoms: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A layout with ``atoms`` on ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis % ndim] = len(atoms)
    return np.asarray(atoms, dtype=np.int64).reshape(shape)


def filled(value: int, ndim: int) -> np.ndarray:
    return np.full((1,) * max(ndim, 0), value, dtype=np.int64)


def canonical(layout: np.ndarray) -> np.ndarray:
    """Collapse axes along which the layout is constant to extent 1."""
    for d in range(layout.ndim):
        if layout.shape[d] > 1 and (layout == layout.take([0], axis=d)).all():
            layout = layout.take([0], axis=d)
    return layout


def reshape_blocks(src: tuple, dst: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of source and destination dims with equal products (a reshape's blocks)."""
    blocks, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        bi, bj, pi, pj = [], [], 1, 1
        if i < len(src):
            bi.append(i); pi *= src[i]; i += 1
        if j < len(dst):
            bj.append(j); pj *= dst[j]; j += 1
        while pi != pj:
            if pi < pj and i < len(src):
                bi.append(i); pi *= src[i]; i += 1
            elif pj < pi and j < len(dst):
                bj.append(j); pj *= dst[j]; j += 1
            else:
                return None
        while i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            bi.append(i); i += 1
        while j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            bj.append(j); j += 1
        blocks.append((bi, bj))
    return blocks


def reshape_layout(layout: np.ndarray, src: tuple, dst: tuple) -> np.ndarray | None:
    """The layout of ``x.reshape(dst)`` given x's layout and shape ``src``; None if the
    reshape cannot be followed."""
    blocks = reshape_blocks(tuple(src), tuple(dst))
    if blocks is None:
        return None
    full_shape, out_shape = [], []
    for bi, bj in blocks:
        varies = any(layout.shape[d] > 1 for d in bi)
        full_shape += [src[d] if varies else 1 for d in bi]
        out_shape += [dst[d] if varies else 1 for d in bj]
    full = np.broadcast_to(layout, full_shape)
    return canonical(np.ascontiguousarray(full).reshape(out_shape))
