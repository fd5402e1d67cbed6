"""Flax linen models. `get_model(name, **kwargs)` builds one by its config name."""

from alijax.models.alexnet import AlexNet, alexnet, alexnet_tiny
from alijax.models.inception_v3 import InceptionV3, inception_tiny, inception_v3
from alijax.models.mobilenet_v2 import (
    MobileNetV2,
    mobilenet_v2,
    mobilenet_v2_cifar,
    mobilenet_v2_tiny,
)
from alijax.models.resnet import (
    LayerOps,
    ResNet,
    resnet18,
    resnet20,
    resnet34,
    resnet50,
    resnet56,
    resnet_tiny,
)
from alijax.models.vgg import VGG, vgg16_bn, vgg16_bn_cifar, vgg_tiny

MODELS = {
    "resnet_tiny": resnet_tiny,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "mobilenet_v2_tiny": mobilenet_v2_tiny,
    "mobilenet_v2_cifar": mobilenet_v2_cifar,
    "mobilenet_v2": mobilenet_v2,
    "vgg_tiny": vgg_tiny,
    "vgg16_bn_cifar": vgg16_bn_cifar,
    "vgg16_bn": vgg16_bn,
    "alexnet_tiny": alexnet_tiny,
    "alexnet": alexnet,
    "inception_tiny": inception_tiny,
    "inception_v3": inception_v3,
}


def get_model(name: str, **kwargs):
    """The model registered under `name`, built with kwargs (num_classes, ops, dtype, ...)."""
    if name not in MODELS:
        raise ValueError(f"{name=} is not a model; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


__all__ = [
    "LayerOps",
    "ResNet",
    "MobileNetV2",
    "VGG",
    "AlexNet",
    "InceptionV3",
    "MODELS",
    "get_model",
] + sorted(MODELS)
