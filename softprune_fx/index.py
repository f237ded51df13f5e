"""A flat numbering of every prunable channel: group channels, then site-group positions.

The cost model, the SCP masks, the constraint engine and the budget decision all work on
one vector with an entry per channel; ``ChannelIndex`` is the engine's ``Space``
(``softprune_fx.passes.constraints``) for an analysis: it maps between that vector, group
indices (``drop`` dicts) and the atoms of mask sites. Frozen channels map to -1 ("always
kept").

Example::

    index = ChannelIndex(cg)
    keep = np.ones(index.size, bool); keep[index.ids("layer1.0.conv1")[:3]] = False
    index.drop_from_keep(keep)            # {"layer1.0.conv1": [0, 1, 2]}
"""
from __future__ import annotations

from softprune_fx.passes.constraints import Constraints, Space


class ChannelIndex(Space):
    def __init__(self, cg):
        super().__init__(cg.flow, cg.groups)
        self.cg = cg

    @property
    def constraints(self) -> Constraints:
        """The constraint engine over this numbering (built once per flow)."""
        return Constraints.build(self.cg.flow, self.cg.groups, self)
