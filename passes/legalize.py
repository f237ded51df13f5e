"""Legalize a drop: add the drops that every constraint needs, or say why it cannot be.

- ``Balance`` (grouped conv): every block keeps the same count; blocks above the smallest
  count drop their lowest-scored positions (a site group's own position first).
- ``Grid`` (channel shuffle, a view splitting channels): a column is dropped whole.
- ``NonEmpty`` (a split piece, a conv's input) and every group keep at least one channel.

Example::

    plan = Plan.from_drop(flow, groups, {"conv1": [0]})
    legalize_plan(plan, constraints, scores=None)
"""
from __future__ import annotations

import numpy as np

from .atoms import carrying_axes
from .errors import IllegalDropError
from .flow import Balance, Grid, NonEmpty
from .plan import Plan

MAX_ROUNDS = 1000


class _Slots:
    """Maps atoms to (group, index) for scores and frozen checks."""

    def __init__(self, plan: Plan, scores: dict | None):
        self.plan = plan
        self.where: dict[int, tuple] = {}
        self.frozen: set[int] = set()
        for g in plan.groups:
            if g.is_site_group:
                continue
            fz = set(g.frozen_channels)
            for i, r in enumerate(g.classes):
                self.where[r] = (g, i)
                if i in fz:
                    self.frozen.add(r)
        self.scores = {k: np.asarray(v, dtype=float) for k, v in (scores or {}).items()}

    def score(self, root: int) -> float:
        g, i = self.where[root]
        s = self.scores.get(g.id)
        return float(s[i]) if s is not None else -float(i)

    def site_score(self, gid: str, pos: int, root: int | None) -> float:
        s = self.scores.get(gid)
        if s is not None:
            return float(s[pos])
        return self.score(root) if root is not None else -float(pos)


def _positions(plan: Plan, atoms: np.ndarray, site) -> tuple[np.ndarray, object]:
    keep = plan.site_keep(site) if site is not None else plan.keep_layout(atoms)
    return keep, plan.site_group_of.get(id(site)) if site is not None else None


def _drop_position(plan: Plan, slots: _Slots, atom: int, pos: int, sg) -> bool:
    if sg is not None:
        plan.site_drops.setdefault(sg.id, set()).add(pos)
        return True
    if atom < 0:
        return False
    root = plan.root(atom)
    if root in slots.frozen:
        return False
    plan.dropped_classes.add(root)
    return True


def _balance(plan: Plan, slots: _Slots, c: Balance) -> bool:
    keep, sg = _positions(plan, c.atoms, c.site)
    blocks = np.split(np.arange(len(c.atoms)), c.blocks)
    counts = [int(keep[b].sum()) for b in blocks]
    target = min(counts)
    changed = False
    for b, count in zip(blocks, counts):
        if count == target:
            continue
        alive = [p for p in b if keep[p]]

        def score(p):
            a = int(c.atoms[p])
            if sg is not None:
                return slots.site_score(sg.id, p, plan.root(a) if a >= 0 else None)
            return slots.score(plan.root(a)) if a >= 0 and plan.root(a) in slots.where else float("inf")
        need = count - target
        for p in sorted(alive, key=score):
            if need == 0:
                break
            if _drop_position(plan, slots, int(c.atoms[p]), p, sg):
                need -= 1
                changed = True
        if need:
            raise IllegalDropError(f"{c.where}: every conv group must keep the same number of channels, "
                                   f"and a group holds frozen channels; drop fewer channels there")
    return changed


def _grid(plan: Plan, slots: _Slots, c: Grid) -> bool:
    axes = carrying_axes(c.layout)
    col_axis = axes[-1]
    keep = plan.keep_layout(c.layout)
    changed = False
    for j in range(c.layout.shape[col_axis]):
        col_keep = np.take(keep, j, axis=col_axis)
        if col_keep.all() or not col_keep.any() and _all_dropped(plan, np.take(c.layout, j, axis=col_axis)):
            continue
        for atom in np.unique(np.take(c.layout, j, axis=col_axis)):
            if atom < 0 or plan.root(int(atom)) in plan.dropped_classes:
                continue
            if plan.root(int(atom)) in slots.frozen:
                raise IllegalDropError(f"{c.where}: a shuffled column must be dropped whole, "
                                       "and it holds a frozen channel")
            plan.dropped_classes.add(plan.root(int(atom)))
            changed = True
    return changed


def _all_dropped(plan: Plan, atoms: np.ndarray) -> bool:
    return all(a >= 0 and plan.root(int(a)) in plan.dropped_classes for a in atoms.reshape(-1))


def legalize_plan(plan: Plan, constraints: list, scores: dict | None = None) -> Plan:
    """Extend ``plan`` in place until every constraint holds; raise when impossible."""
    slots = _Slots(plan, scores)
    for _ in range(MAX_ROUNDS):
        changed = False
        for c in constraints:
            if isinstance(c, Balance):
                changed |= _balance(plan, slots, c)
            elif isinstance(c, Grid):
                changed |= _grid(plan, slots, c)
        if not changed:
            break
    check_plan(plan, constraints)
    return plan


def check_plan(plan: Plan, constraints: list) -> None:
    """Raise unless nothing is emptied and every constraint holds."""
    for g in plan.groups:
        if g.is_site_group:
            continue
        if g.width and all(r in plan.dropped_classes for r in g.classes):
            raise IllegalDropError(f"the drop would remove every channel of group {g.id!r}")
    for c in constraints:
        if isinstance(c, NonEmpty):
            keep, _ = _positions(plan, c.atoms, c.site)
            if len(keep) and not keep.any():
                raise IllegalDropError(f"the drop would remove every channel of the {c.where}")
        elif isinstance(c, Balance):
            keep, _ = _positions(plan, c.atoms, c.site)
            counts = {int(keep[b].sum()) for b in np.split(np.arange(len(c.atoms)), c.blocks)}
            if len(counts) > 1:
                raise IllegalDropError(f"{c.where}: conv groups would keep different channel counts {sorted(counts)}; "
                                       "legalize() adds the drops that balance them")
            if counts == {0}:
                raise IllegalDropError(f"{c.where}: the drop would empty every conv group")
        elif isinstance(c, Grid):
            keep = plan.keep_layout(c.layout)
            col_axis = carrying_axes(c.layout)[-1]
            for j in range(c.layout.shape[col_axis]):
                col = np.take(keep, j, axis=col_axis)
                if col.any() and not col.all():
                    raise IllegalDropError(f"{c.where}: a shuffled channel column is only partly dropped; "
                                           "legalize() drops it whole")
