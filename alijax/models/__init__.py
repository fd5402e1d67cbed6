"""Flax linen models. `get_model(name, **kwargs)` builds one by its config name."""

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

MODELS = {
    "resnet_tiny": resnet_tiny,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}


def get_model(name: str, **kwargs):
    """The model registered under `name`, built with kwargs (num_classes, ops, dtype, ...)."""
    if name not in MODELS:
        raise ValueError(f"{name=} is not a model; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


__all__ = ["LayerOps", "ResNet", "MODELS", "get_model"] + sorted(MODELS)
