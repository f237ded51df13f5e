"""torchvision 0.29's model families for ``bench_ecosystem.py --torchvision``: classification (one or two
sizes per family, the largest left out for time), segmentation, video (5-D input), detection backbones
with their FPN, and RAFT. ``weights=None``; eval mode; norms randomised by ``bench_ecosystem.build``."""
from __future__ import annotations

from torch import nn

CLASSIFICATION = (
    "alexnet", "convnext_tiny", "densenet121", "densenet161", "efficientnet_b0", "efficientnet_b3",
    "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mnasnet1_0", "mobilenet_v2",
    "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "regnet_y_1_6gf", "resnet18",
    "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
    "squeezenet1_0", "squeezenet1_1", "swin_t", "swin_v2_t", "vgg11", "vgg11_bn", "vit_b_16", "vit_b_32",
    "wide_resnet50_2",
)
SEGMENTATION = ("deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "fcn_resnet50", "lraspp_mobilenet_v3_large")
VIDEO = ("r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v2_s", "swin3d_t")
DETECTION = ("fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn_v2", "ssdlite320_mobilenet_v3_large",
             "fcos_resnet50_fpn")


class Out(nn.Module):
    """A model's tensors as a tuple: a segmentation dict's values, a backbone's feature maps, RAFT's
    last flow estimate."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x):
        if self.kind == "raft":
            return self.model(x, x.flip(-1), num_flow_updates=2)[-1]
        y = self.model(x)
        return tuple(y.values()) if isinstance(y, dict) else y


def _classification(name: str):
    def build():
        import torchvision.models as M
        kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        return M.get_model(name, weights=None, **kw), 299 if name == "inception_v3" else 224
    return build


def _segmentation(name: str):
    def build():
        import torchvision.models as M
        return Out(M.get_model(name, weights=None, weights_backbone=None), "seg"), 224
    return build


def _video(name: str):
    def build():
        import torchvision.models as M
        size = (1, 3, 16, 224, 224) if name.startswith(("mvit", "s3d")) else (1, 3, 8, 112, 112)
        return M.get_model(name, weights=None), size
    return build


def _detection_backbone(name: str):
    def build():
        import torchvision.models as M
        det = M.get_model(name, weights=None, weights_backbone=None)
        return Out(det.backbone, "backbone"), 320
    return build


def _raft():
    import torchvision.models as M
    return Out(M.get_model("raft_small", weights=None), "raft"), (1, 3, 128, 128)


def torchvision_models() -> dict:
    """Name -> builder returning ``(model, px or input shape)``."""
    return {**{f"tv_{n}": _classification(n) for n in CLASSIFICATION},
            **{f"tv_{n}": _segmentation(n) for n in SEGMENTATION},
            **{f"tv_{n}": _video(n) for n in VIDEO},
            **{f"tv_{n}_backbone": _detection_backbone(n) for n in DETECTION},
            "tv_raft_small": _raft}
