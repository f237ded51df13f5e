"""More ecosystem models for ``bench_ecosystem.py --extra`` (BENCHMARKS.md section 13): ultralytics
task heads and versions, Hugging Face and smp architectures, timm families beyond the main list.
Builders are ``bench_ecosystem``'s own (configs only, no weights)."""
from __future__ import annotations

import torch
from torch import nn

YOLO = {
    "yolov5n": ("yolov5n.yaml", "DetectionModel"), "yolov3-tiny": ("yolov3-tiny.yaml", "DetectionModel"),
    "yolov6n": ("yolov6n.yaml", "DetectionModel"), "yolov8n-pose": ("yolov8n-pose.yaml", "PoseModel"),
    "yolov8n-obb": ("yolov8n-obb.yaml", "OBBModel"), "yolov8n-ghost": ("yolov8n-ghost.yaml", "DetectionModel"),
    "yolov8n-p2": ("yolov8n-p2.yaml", "DetectionModel"), "yolov9t": ("yolov9t.yaml", "DetectionModel"),
    "yolov9c-seg": ("yolov9c-seg.yaml", "SegmentationModel"), "yolov10n": ("yolov10n.yaml", "DetectionModel"),
    "yolo11n-pose": ("yolo11n-pose.yaml", "PoseModel"), "yolo11n-obb": ("yolo11n-obb.yaml", "OBBModel"),
    "yolo11n-cls": ("yolo11n-cls.yaml", "ClassificationModel"), "yolo12n": ("yolo12n.yaml", "DetectionModel"),
    "yolo12n-seg": ("yolo12n-seg.yaml", "SegmentationModel"), "yolo26n": ("yolo26n.yaml", "DetectionModel"),
    "yolo26n-seg": ("yolo26n-seg.yaml", "SegmentationModel"), "yolo26n-pose": ("yolo26n-pose.yaml", "PoseModel"),
    "yolo26n-cls": ("yolo26n-cls.yaml", "ClassificationModel"), "rtdetr-l": ("rtdetr-l.yaml", "RTDETRDetectionModel"),
    "yolov8-cls-resnet50": ("yolov8-cls-resnet50.yaml", "ClassificationModel"),
}
HF = ("ConvNextV2", "RegNet", "MobileViT", "MobileViTV2", "MobileNetV1", "Bit", "PoolFormer", "Segformer", "Cvt",
      "FocalNet", "Dinov2", "Beit", "Levit", "Swinv2", "Data2VecVision", "ViTMSN", "DeiT")
#: Hugging Face task heads and backbones beyond image classification: (config, model class, input px, config options)
HF_TASKS = {
    "Pvt": ("Pvt", "PvtForImageClassification", None, {}),
    "PvtV2": ("PvtV2", "PvtV2ForImageClassification", None, {}),
    "SwiftFormer": ("SwiftFormer", "SwiftFormerForImageClassification", None, {}),
    "Hiera": ("Hiera", "HieraForImageClassification", None, {}),
    "Dinov2WithRegisters": ("Dinov2WithRegisters", "Dinov2WithRegistersForImageClassification", None, {}),
    "TextNet": ("TextNet", "TextNetForImageClassification", None, {}),
    "IJepa": ("IJepa", "IJepaForImageClassification", None, {}),
    "SiglipVision": ("SiglipVision", "SiglipVisionModel", None, {}),
    "CLIPVision": ("CLIPVision", "CLIPVisionModel", None, {}),
    "SegformerSeg": ("Segformer", "SegformerForSemanticSegmentation", 256, {}),
    "UperNet": ("UperNet", "UperNetForSemanticSegmentation", 256, {}),
    "DPT": ("DPT", "DPTForDepthEstimation", 384, {}),
    "DepthAnything": ("DepthAnything", "DepthAnythingForDepthEstimation", 266, {}),
    "GLPN": ("GLPN", "GLPNForDepthEstimation", 256, {}),
    "ZoeDepth": ("ZoeDepth", "ZoeDepthForDepthEstimation", 384, {}),
    "MobileViTSeg": ("MobileViT", "MobileViTForSemanticSegmentation", 256, {}),
    "Yolos": ("Yolos", "YolosForObjectDetection", 224,
              {"image_size": [224, 224], "hidden_size": 192, "num_attention_heads": 3, "intermediate_size": 768}),
    "RTDetr": ("RTDetr", "RTDetrForObjectDetection", 320, {}),
    "Detr": ("Detr", "DetrForObjectDetection", 320, {"use_timm_backbone": False, "use_pretrained_backbone": False}),
    "ConditionalDetr": ("ConditionalDetr", "ConditionalDetrForObjectDetection", 320,
                        {"use_timm_backbone": False, "use_pretrained_backbone": False}),
    "Mask2Former": ("Mask2Former", "Mask2FormerForUniversalSegmentation", 256, {}),
}
SMP = (("UnetPlusPlus", "resnet18"), ("PSPNet", "resnet18"), ("PAN", "resnet18"), ("MAnet", "resnet18"),
       ("DeepLabV3", "resnet18"), ("UPerNet", "resnet18"), ("Unet", "efficientnet-b0"), ("Unet", "timm-efficientnet-b0"),
       ("Unet", "densenet121"), ("FPN", "timm-regnetx_002"), ("Segformer", "mit_b0"), ("Unet", "tu-convnext_atto"),
       ("Unet", "resnext50_32x4d"), ("Unet", "mobileone_s0"))
TIMM = (
    "efficientnet_b0", "mobilenetv3_small_100", "ghostnet_100", "regnety_002", "convnext_atto", "resnest14d",
    "ese_vovnet19b_dw", "dla34", "hrnet_w18_small", "cspdarknet53", "rexnet_100", "levit_128s", "poolformer_s12",
    "edgenext_xx_small", "mobilevit_xxs", "efficientformer_l1", "repvgg_a0", "fastvit_t8", "mobileone_s0", "lcnet_050",
    "hgnetv2_b0", "vit_tiny_patch16_224", "tinynet_a", "res2net50_26w_4s", "selecsls42b", "densenet121", "dpn68",
    "xception41", "inception_v3", "nasnetalarge", "tf_mixnet_s", "coat_lite_tiny", "maxvit_nano_rw_256",
    "efficientvit_b0", "mobilenetv4_conv_small", "starnet_s1", "repghostnet_050", "resnet50d", "seresnext26d_32x4d",
    "skresnet18", "cspresnet50", "gernet_s", "nf_regnet_b0", "efficientnetv2_rw_t", "mixnet_s", "mnasnet_100",
    "ghostnetv2_100", "hardcorenas_a", "resmlp_12_224", "gmlp_ti16_224", "visformer_tiny", "pit_ti_224",
    "twins_svt_small", "pvt_v2_b0", "convit_tiny", "cait_xxs24_224", "xcit_nano_12_p16_224", "inception_next_tiny",
    "davit_tiny", "regnetz_b16", "botnet26t_256", "halonet26t", "lambda_resnet26t", "ecaresnet26t",
    "resnetv2_50x1_bit", "sequencer2d_s", "mobilevitv2_050", "efficientformerv2_s0", "tiny_vit_5m_224",
    "nextvit_small", "focalnet_tiny_srf", "vovnet39a", "dpn68b", "legacy_seresnet18", "fbnetc_100", "mixer_s16_224",
    "convnextv2_atto", "regnetx_002", "crossvit_9_240", "coatnet_nano_rw_224", "efficientvit_m0", "fastvit_sa12",
    "rdnet_tiny", "hgnet_tiny", "vit_small_patch16_224.dino", "deit3_small_patch16_224", "beit_base_patch16_224",
)


class HFOutputs(nn.Module):
    """The tensors of a Hugging Face task model's output, in order."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, x):
        return tuple(v for v in self.m(pixel_values=x).values() if isinstance(v, torch.Tensor))


def hf_task(config: str, model: str, px, options: dict):
    def build():
        import transformers as T
        cfg = getattr(T, f"{config}Config")(**options)
        size = px or getattr(cfg, "image_size", 224)
        return HFOutputs(getattr(T, model)(cfg)), size[0] if isinstance(size, (list, tuple)) else size
    return build


def extra_models(yolo, hf, smp_model, timm_model) -> dict:
    """Name -> builder, from ``bench_ecosystem``'s builder factories."""
    return {**{name: yolo(cfg, kind) for name, (cfg, kind) in YOLO.items()},
            **{f"hf_{n}": hf(n) for n in HF},
            **{f"hf_{n}": hf_task(*spec) for n, spec in HF_TASKS.items()},
            **{f"smp_{a}_{e}": smp_model(a, e) for a, e in SMP},
            **{f"timm_{n}": timm_model(n) for n in TIMM}}
