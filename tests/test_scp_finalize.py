"""finalize behind learned gates: a channel whose gate training closed but that the decision's
rounding keeps is made silent (``bnsites.silenced``), and gated channels train on the hard rule's
forward (``SCPConfig.straight_through``)."""
import numpy as np
import torch
from zoo_activations import ZOO_ACTIVATIONS

import softprune_fx as sp
from softprune_fx.bnsites import silenced
from softprune_fx.scp import SCPConfig


def _gelu_pruner(ratio=0.4, **scp):
    model, inputs = ZOO_ACTIVATIONS["resnet_gelu"]()
    return sp.SoftPruner(model, inputs, ratio=ratio, scp=SCPConfig(**scp)), inputs


def _close(pruner, gid, n):
    """Close the gates of the first ``n`` channels of group ``gid``; returns their flat ids."""
    ids = pruner.index.ids(gid)[:n]
    with torch.no_grad():
        pruner.bank.gate_logits[torch.as_tensor(ids)] = 5.0
    return ids


def _wide_group(pruner):
    return next(g.id for g in pruner.cg.groups if g.prunable and g.width >= 32)


def test_sites_know_whether_their_activation_is_zero_at_zero():
    pruner, _ = _gelu_pruner()
    assert pruner.bank.sites and all(s.silent for s in pruner.bank.sites)  # GELU(0) = 0
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Sigmoid(),
                                torch.nn.Conv2d(8, 4, 3))
    sig = sp.SoftPruner(model, torch.randn(2, 3, 8, 8), ratio=0.3)
    assert sig.bank.sites and not any(s.silent for s in sig.bank.sites)  # sigmoid(0) = 0.5


def test_a_silenced_channel_outputs_what_its_closed_mask_did():
    pruner, inputs = _gelu_pruner()
    pruner.model.eval()
    ids = _close(pruner, _wide_group(pruner), 3)
    with torch.no_grad():
        closed = pruner.model(*inputs)
        flat = np.zeros(pruner.index.size, bool)
        flat[ids] = True
        pruner.bank.gate_logits[torch.as_tensor(ids)] = -5.0          # the gates open again
        opened = pruner.model(*inputs)
        with silenced(pruner.bank.sites, pruner.base.get_parameter, flat) as n:
            silent = pruner.model(*inputs)
        restored = pruner.model(*inputs)
    assert n == 3
    assert (opened - closed).abs().max() > 1e-3                       # an open channel changes the output
    torch.testing.assert_close(silent, closed, atol=1e-5, rtol=1e-5)  # a silent one does not
    torch.testing.assert_close(restored, opened)                      # and the weights come back


def _revive(silence):
    """ratio 0.01: the decision keeps everything (cut 0 is within tol), so rounding revives the
    three closed channels of a 32-wide group (29 is not a multiple of its step, 8)."""
    pruner, inputs = _gelu_pruner(ratio=0.01, silence_revived=silence)
    _close(pruner, _wide_group(pruner), 3)
    pruner.model.eval()
    with torch.no_grad():
        masked = pruner.model(*inputs)
    pruned, result = pruner.finalize()
    with torch.no_grad():
        return (pruned.eval()(*inputs) - masked).abs().max().item(), result


def test_finalize_keeps_a_revived_channel_silent():
    diff, result = _revive(True)
    assert result.silenced == 3 and result.achieved_ratio == 0.0
    assert diff < 1e-5  # the pruned model predicts the masked one


def test_without_silencing_a_revived_channel_changes_the_prediction():
    diff, result = _revive(False)
    assert result.silenced == 0 and diff > 1e-3


def test_straight_through_forwards_the_hard_rule_and_keeps_the_gradient():
    pruner, inputs = _gelu_pruner(straight_through=True)
    ids = _close(pruner, _wide_group(pruner), 3)
    pruner.model.train()
    masks = pruner.bank(*pruner._site_params())
    gates = pruner.bank.gates()
    hard = (pruner.bank.last_pi < 0.5).float()
    assert torch.equal(masks[:-1][gates].detach(), hard[gates])       # 0/1: no Gumbel noise forward
    assert not masks[torch.as_tensor(ids)].any()
    masks[:-1][gates].sum().backward()
    assert pruner.bank.gate_logits.grad[gates].abs().sum() > 0        # the soft mask's gradient


def test_gate_spread_separates_a_groups_gates_and_keeps_every_channel():
    flat = _gelu_pruner()[0].bank.gate_logits.detach()
    pruner, inputs = _gelu_pruner(gate_spread=1.0)
    logits = pruner.bank.gate_logits.detach()
    assert torch.unique(flat).numel() == 1
    for g in pruner.cg.groups:
        if g.prunable and g.width > 1:
            mine = logits[torch.as_tensor(pruner.index.ids(g.id))]
            assert torch.unique(mine).numel() == g.width and (mine < 0).all()
            assert abs(float(mine.mean()) - float(flat[0])) < 1e-5 and float(mine.max() - mine.min()) > 1.9
    assert pruner.hard_keep().all()


def _dropped_by_l1(order):
    """finalize of an untrained GELU net (every gate live): per group with drops, whether every
    dropped channel's consumer L1 is at most every kept one's."""
    from softprune_fx.oneshot import consumer_l1
    pruner, _ = _gelu_pruner(order_live_gates=order)
    l1 = consumer_l1(pruner.cg, pruner.index, pruner.base)
    _, result = pruner.finalize()
    verdicts = []
    for gid, dropped in result.drop.items():
        ids = pruner.index.ids(gid)
        if len(dropped) and pruner.bank.gates()[torch.as_tensor(ids)].all():
            gone = np.zeros(len(ids), bool)
            gone[list(dropped)] = True
            verdicts.append(l1[ids][gone].max() <= l1[ids][~gone].min())
    return verdicts


def test_finalize_cuts_live_gated_channels_by_their_consumer_weights():
    verdicts = _dropped_by_l1(True)
    assert verdicts and all(verdicts)
    assert not all(_dropped_by_l1(False))  # the gates' own scores order them otherwise


def _convnext_hard(kept: int):
    """The LayerNorm ConvNeXt (gates, no BN site) with ``kept`` of ``down.1``'s 32 gates open:
    (pruner, keep0 after _round_unsilenced, the group's flat ids, scores)."""
    from softprune_fx.pruner import _round_unsilenced
    model, inputs = ZOO_ACTIVATIONS["convnext_ln"]()
    pruner = sp.SoftPruner(model, inputs, ratio=0.4)
    ids = pruner.index.ids("down.1")
    with torch.no_grad():
        pruner.bank.gate_logits[torch.as_tensor(ids[kept:])] = 5.0
    keep0 = pruner.hard_keep() | pruner.bank.fixed.numpy()
    scores = pruner.bank.scores(pruner._site_params())
    return _round_unsilenced(pruner.cg, pruner.index, keep0, scores, pruner._closed_loud(keep0), "auto", 1), ids, scores


def test_a_group_with_loud_closed_gates_rounds_to_the_nearer_step():
    keep, ids, scores = _convnext_hard(9)          # 9 of 32, step 8: 8 is nearer than 16
    assert keep[ids].sum() == 8
    gone = ids[:9][~keep[ids[:9]]]
    assert len(gone) == 1 and scores[gone[0]] == scores[ids[:9]].min()
    keep, ids, _ = _convnext_hard(13)              # 16 is nearer: left to the decision
    assert keep[ids].sum() == 13
