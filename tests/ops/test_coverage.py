"""Every registry key has a test in tests/ops (a key added without one fails here), and
strict mode turns a rule's exception into an error instead of a freeze."""
import pytest
import torch
from harness import check
from torch import nn

import softprune_fx as sp
import test_elementwise
import test_norm_mixing
import test_reduce
import test_shape_slicing
from softprune_fx.passes.flow import strict, strict_mode
from softprune_fx.passes.ops import register_op, registered_keys
from softprune_fx.passes.registry import _REGISTRY

QUALIFIED = {"torchvision.ops.stochastic_depth.stochastic_depth"}  # test_elementwise's by-name test


def covered() -> set:
    keys = set(QUALIFIED) | {"is_contiguous"}  # test_python_value_key
    for module in (test_elementwise, test_norm_mixing, test_reduce, test_shape_slicing):
        keys.update(case[0] for case in module.CASES)
    keys.update(case[0] for case in test_elementwise.NEW_TENSORS)
    return keys


def test_every_registered_key_has_a_test():
    missing = [k for k in registered_keys() if k not in covered()]
    assert not missing, f"registry keys without a test in tests/ops: {missing}"


def test_python_value_key():
    """``x.is_contiguous()`` stays a node (a Python bool, no channels)."""
    check("is_contiguous", lambda s, x: x * x.is_contiguous(), True)


def wrong(x):
    return x * 1.0


torch.fx.wrap("wrong")


def broken_rule(ctx, node):
    raise ValueError("a bug in a rule")


class WithBrokenRule(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(wrong(self.a(x)))


def test_strict_mode_raises_rule_errors_and_lenient_mode_freezes():
    assert strict_mode()  # tests/conftest.py turns it on for the suite
    register_op(wrong, broken_rule)
    try:
        net, x = WithBrokenRule().eval(), (torch.randn(1, 3, 8, 8),)
        with pytest.raises(ValueError, match="a bug in a rule") as info:
            sp.analyze(net, x)
        assert any("strict mode" in note for note in getattr(info.value, "__notes__", []))
        with strict(False):
            cg = sp.analyze(net, x)
        g = next(g for g in cg.groups if "a" in g.producers)
        assert not g.prunable and "rule failed (ValueError: a bug in a rule)" in g.frozen_reason
        assert strict_mode()  # restored
    finally:
        _REGISTRY.pop(wrong, None)
