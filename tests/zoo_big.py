"""Full-size benchmark models (ImageNet layout, 224 px, batch 1). Not in ZOO: used only
by benchmarks. They reuse the zoo's parametrised classes."""
from __future__ import annotations

try:
    from .zoo_cnn import Bottleneck, DenseNet, ResNet
    from .zoo_common import finish, seeded
    from .zoo_mobile import MOBILENETV2_FULL, MobileNetV2
except ImportError:  # imported with tests/ on sys.path
    from zoo_cnn import Bottleneck, DenseNet, ResNet
    from zoo_common import finish, seeded
    from zoo_mobile import MOBILENETV2_FULL, MobileNetV2

IMAGENET = (1, 3, 224, 224)


def resnet50():
    """torchvision ResNet-50: Bottleneck [3, 4, 6, 3], widths 64..2048, fc 1000."""
    seeded()
    return finish(ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], stem=64,
                         num_classes=1000), IMAGENET)


def mobilenetv2_full():
    """MobileNetV2 1.0: stem 32, torchvision inverted-residual settings, last 1280."""
    seeded()
    return finish(MobileNetV2(MOBILENETV2_FULL, stem=32, last=1280, num_classes=1000), IMAGENET)


def densenet121():
    """DenseNet-121: growth 32, blocks (6, 12, 24, 16), 64 init features, bn_size 4."""
    seeded()
    return finish(DenseNet(growth=32, blocks=(6, 12, 24, 16), init=64, bn_size=4,
                           num_classes=1000, big_stem=True), IMAGENET)


BIG = {
    "resnet50": resnet50,
    "mobilenetv2_full": mobilenetv2_full,
    "densenet121": densenet121,
}
