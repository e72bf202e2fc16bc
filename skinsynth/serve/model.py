"""The classifier as the endpoint serves it: preprocessing, probabilities, uncertainty, risk band, OOD, Grad-CAM.

Everything here is plain PyTorch/NumPy so it can be tested and benchmarked without Ray; ``skinsynth.serve.app``
wraps it in a Ray Serve deployment.

- Preprocessing is the data plane's own pixel steps (``prepare_pixels``, which ``prepare`` runs before writing a
  shard's PNG) with the run's ``data.preprocess`` settings (read from the data card), then the normalisation
  training used, so an upload sees exactly the pixels the model learnt from. The shard's lossless PNG round trip
  and the tone estimate are left out: neither changes a pixel.
- Risk band: ``low`` below the validation operating point (malignant sensitivity >= 0.90, from the model card),
  ``high`` from the malignant score at which validation specificity reaches ``serve.high_risk_specificity``,
  ``medium`` between.
- Uncertainty: predictive entropy of the class probabilities; on request, the spread (standard deviation) of the
  top-class probability over the four flips (test-time augmentation).
- Out of distribution: the distance of the L2-normalised pre-logits features to the k-th nearest labelled training
  image (Sun et al. 2022, "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML). It needs no density
  fit, which matters with a few hundred training images in 1,280 dimensions (a class-conditional Mahalanobis fit let
  noise and flat images through on the demo). The threshold is the ``serve.ood_quantile`` quantile of the
  validation images' distances, so about 5% of unseen in-distribution images are flagged by design.
- Grad-CAM (Selvaraju et al. 2017, ICCV) on the last feature map, for the top class, as a PNG overlay.

The calibration is written next to the model (``serving.json`` and ``serving.npz``, arrays only, read with
``allow_pickle=False``) so a model directory copied elsewhere keeps serving without its run's data.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skinsynth import DISCLAIMER
from skinsynth.config import PreprocessConfig, ServeConfig, section_from_dict
from skinsynth.core.rundir import BEST_MODEL, MODEL_CARD, MODEL_TRAINING, MODEL_WEIGHTS, layout
from skinsynth.core.storage import local_run_dir
from skinsynth.errors import SkinsynthError

CALIBRATION_JSON = "serving.json"
CALIBRATION_ARRAYS = "serving.npz"
FEATURE_BATCH = 64


class ServeError(SkinsynthError, ValueError):
    """A model directory that cannot be served, with what is missing."""


@dataclass
class Calibration:
    """Thresholds chosen on the validation split of the model's run."""

    model_id: str
    medium_from: float  # malignant score: the validation operating point (sensitivity >= 0.90)
    high_from: float  # malignant score where validation specificity reaches high_risk_specificity
    high_risk_specificity: float
    ood_threshold: float
    ood_quantile: float
    ood_neighbours: int  # k of the k-th nearest training image
    n_fit: int  # labelled training images the OOD distances are measured to
    n_threshold: int  # validation images its threshold was chosen on
    preprocess: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ServedModel:
    """A loaded classifier with everything a prediction needs."""

    model: torch.nn.Module
    model_id: str
    model_dir: Path
    classes: list[str]
    image_size: int
    preprocess: PreprocessConfig
    mean: tuple[float, ...]
    std: tuple[float, ...]
    calibration: Calibration
    train_features: torch.Tensor  # [N, D] L2-normalised pre-logits features of the labelled training images
    card: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/model`` returns: the model card plus how this endpoint calibrated it."""
        return {
            "model_id": self.model_id,
            "model_dir": str(self.model_dir),
            "classes": self.classes,
            "image_size": self.image_size,
            "card": self.card,
            "serving_calibration": self.calibration.summary(),
            "disclaimer": DISCLAIMER,
        }


def weights_id(model_dir: Path) -> str:
    """Short content hash of the weights: the model id every response carries."""
    digest = hashlib.sha256()
    with open(model_dir / MODEL_WEIGHTS, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def prepare_upload(data: bytes, preprocess: PreprocessConfig, max_pixels: int | None = None) -> np.ndarray:
    """Uploaded bytes -> the RGB uint8 image the model sees, through the data plane's own preprocessing.

    ``max_pixels`` (the endpoint's ``serve.max_pixels``) replaces the training data's own pixel cap when given.

    Raises:
        skinsynth.data.preprocess.BadImage: empty, not an image, truncated, grayscale, too small or too large.
    """
    from skinsynth.data.preprocess import prepare_pixels

    # the shards' PNG is lossless, so these are the pixels training decoded; the tone estimate only feeds the data
    # card and fairness tables, and costs a CIELAB conversion and a skin mask per request
    cap = preprocess.max_pixels if max_pixels is None else max_pixels
    rgb, _ = prepare_pixels(data, replace(preprocess, estimate_tone=False, max_pixels=cap))
    return rgb


def _model_input(served: ServedModel, images: list[np.ndarray]) -> torch.Tensor:
    from skinsynth.core.shards import to_model_input

    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return to_model_input(batch, served.mean, served.std).contiguous(memory_format=torch.channels_last)


def _features_and_logits(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    return features, model.get_classifier()(features)


def knn_distance(features: torch.Tensor, train_features: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean distance of each L2-normalised feature row to its k-th nearest (normalised) training feature.

    Both sides are unit vectors, so ``|q - t|^2 = 2 - 2 q.t`` and the k-th nearest is the k-th most similar: one
    matrix product. ``torch.cdist`` over the 7,012 HAM10000 training features took twice the CNN's own time per
    served batch on 2 cores.
    """
    query = torch.nn.functional.normalize(features.float(), dim=1)
    similarity = query @ train_features.float().T
    kth = similarity.topk(min(k, train_features.shape[0]), largest=True).values[:, -1]
    return (2.0 - 2.0 * kth).clamp_min(0.0).sqrt()


def _malignant(probs: torch.Tensor, classes: list[str]) -> torch.Tensor:
    from skinsynth.classify.metrics import malignant_scores

    return malignant_scores(probs, classes)


def risk_band(score: float, calibration: Calibration) -> str:
    if score >= calibration.high_from:
        return "high"
    return "medium" if score >= calibration.medium_from else "low"


def predict_images(served: ServedModel, images: list[np.ndarray], tta: list[bool]) -> list[dict[str, Any]]:
    """One response body per prepared image (``tta[i]`` adds the flip spread for image ``i``)."""
    if not images:
        return []
    # the model's device: CPU for the endpoint, a GPU for a batch-prediction actor that holds one
    x = _model_input(served, images).to(served.train_features.device)
    with torch.no_grad():
        features, logits = _features_and_logits(served.model, x)
        probs = torch.softmax(logits.float(), dim=1)
        distances = knn_distance(features, served.train_features, served.calibration.ood_neighbours)
        wanted = [i for i, flag in enumerate(tta) if flag]
        spread: dict[int, float] = {}
        if wanted:
            sub = x[wanted]
            views = torch.stack(
                [probs[wanted]]
                + [
                    torch.softmax(served.model(view).float(), dim=1)
                    for view in (sub.flip(-1), sub.flip(-2), sub.flip(-1, -2))
                ]
            )  # [4, n, C]
            top = probs[wanted].argmax(dim=1)
            top_probs = views[:, torch.arange(len(wanted)), top]
            spread = {i: float(s) for i, s in zip(wanted, top_probs.std(dim=0, unbiased=False), strict=True)}
    probs, distances = probs.cpu(), distances.cpu()
    malignant = _malignant(probs, served.classes)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
    calibration = served.calibration
    out = []
    for i in range(len(images)):
        top = int(probs[i].argmax())
        score = float(malignant[i])
        out.append(
            {
                "model_id": served.model_id,
                "probabilities": {c: float(p) for c, p in zip(served.classes, probs[i], strict=True)},
                "top_class": served.classes[top],
                "top_probability": float(probs[i, top]),
                "malignant_probability": score,
                "risk_band": risk_band(score, calibration),
                "risk_thresholds": {"medium_from": calibration.medium_from, "high_from": calibration.high_from},
                "uncertainty": {
                    "entropy": float(entropy[i]),
                    "normalised_entropy": float(entropy[i]) / math.log(len(served.classes)),
                    "tta_std": spread.get(i),
                },
                "out_of_distribution": bool(distances[i] > calibration.ood_threshold),
                "ood_score": float(distances[i]),
                "ood_threshold": calibration.ood_threshold,
                "disclaimer": DISCLAIMER,
            }
        )
    return out


def gradcam_png(served: ServedModel, image: np.ndarray, class_name: str | None = None) -> bytes:
    """Grad-CAM of ``class_name`` (default: the top class) on the last feature map, over the image, as PNG."""
    import cv2

    from skinsynth.data.preprocess import encode_png

    model = served.model
    x = _model_input(served, [image]).to(served.train_features.device)
    with torch.enable_grad():
        feature_map = model.forward_features(x).detach().requires_grad_(True)
        logits = model.forward_head(feature_map)
        target = served.classes.index(class_name) if class_name else int(logits.argmax(dim=1))
        (grads,) = torch.autograd.grad(logits[0, target], feature_map)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * feature_map).sum(dim=1))[0].detach().cpu().numpy()
    cam = cam / cam.max() if cam.max() > 0 else cam
    height, width = image.shape[:2]
    heat = cv2.resize(cam.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    colour = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    overlay = (0.55 * image.astype(np.float32) + 0.45 * colour.astype(np.float32)).clip(0, 255).astype(np.uint8)
    return encode_png(overlay)


def gradcam_base64(served: ServedModel, image: np.ndarray) -> str:
    return base64.b64encode(gradcam_png(served, image)).decode("ascii")


# --- calibration on the validation split -------------------------------------------------------------------------


def _run_dir_of(model_dir: Path, card: dict[str, Any]) -> Path | None:
    recorded = (card.get("data") or {}).get("run_dir")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    guess = model_dir.parent.parent  # RUN_DIR/models/<name>
    return guess if layout(guess).data_card.is_file() else None


def _split_features(model, run_dir: Path, split: str, mean, std) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Pre-logits features, probabilities and labels of one split (train: its labelled images only)."""
    from skinsynth.core.shards import decode_pngs, load_split_table, read_rows, split_ids, to_model_input

    ids = split_ids(load_split_table(run_dir), split, labelled_only=split == "train")
    rows = read_rows(run_dir, ids, ["image_id", "image", "label"])
    if len(rows) < 4:
        raise ServeError(f"{run_dir} has {len(rows)} {split} images: at least 4 are needed to calibrate serving")
    features, probs = [], []
    with torch.no_grad():
        for start in range(0, len(rows), FEATURE_BATCH):
            x = to_model_input(decode_pngs(rows["image"].iloc[start : start + FEATURE_BATCH]), mean, std)
            f, logits = _features_and_logits(model, x)
            features.append(f.float())
            probs.append(torch.softmax(logits.float(), dim=1))
    return torch.cat(features), torch.cat(probs), rows["label"].to_numpy(np.int64)


def calibrate(
    model: torch.nn.Module,
    model_dir: Path,
    run_dir: Path,
    classes: list[str],
    preprocess: PreprocessConfig,
    card: dict[str, Any],
    sc: ServeConfig,
    mean,
    std,
) -> tuple[Calibration, torch.Tensor]:
    """Choose the risk thresholds and the OOD threshold on the run's validation split; write them next to
    the model."""
    from skinsynth.classify.metrics import choose_operating_point, is_malignant_label

    features, probs, labels = _split_features(model, run_dir, "val", mean, std)
    scores = _malignant(probs, classes).numpy()
    malignant = is_malignant_label(labels, classes).numpy().astype(bool)
    operating = (card.get("operating_point") or {}).get("threshold")
    if operating is None:
        operating = choose_operating_point(scores, malignant, 0.90) if malignant.any() and (~malignant).any() else 0.5
    benign = scores[~malignant]
    high = float(np.quantile(benign, sc.high_risk_specificity)) if len(benign) else 1.0
    # the OOD model is fitted on the labelled training images and its threshold set on validation images it
    # never saw, so ood_quantile is the share of unseen in-distribution images let through
    train_features, _, train_labels = _split_features(model, run_dir, "train", mean, std)
    # float16 halves the sidecar file (HAM10000: 7,000 x 1,280); distances are computed in float32
    train_features = torch.nn.functional.normalize(train_features, dim=1).half()
    held = knn_distance(features, train_features, sc.ood_neighbours).numpy()
    calibration = Calibration(
        model_id=weights_id(model_dir),
        medium_from=float(operating),
        high_from=max(high, float(operating)),
        high_risk_specificity=sc.high_risk_specificity,
        ood_threshold=float(np.quantile(held, sc.ood_quantile)),
        ood_quantile=sc.ood_quantile,
        ood_neighbours=sc.ood_neighbours,
        n_fit=len(train_labels),
        n_threshold=len(labels),
        preprocess=asdict(preprocess),
    )
    (model_dir / CALIBRATION_JSON).write_text(json.dumps(calibration.summary(), indent=2))
    np.savez(model_dir / CALIBRATION_ARRAYS, train_features=train_features.numpy())
    return calibration, train_features


def _read_calibration(model_dir: Path, model_id: str, sc: ServeConfig):
    try:
        summary = json.loads((model_dir / CALIBRATION_JSON).read_text())
        with np.load(model_dir / CALIBRATION_ARRAYS, allow_pickle=False) as arrays:
            train_features = torch.from_numpy(arrays["train_features"])
        calibration = Calibration(**summary)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, or written by another version: calibrate again
    settings = (calibration.ood_quantile, calibration.high_risk_specificity, calibration.ood_neighbours)
    same = settings == (sc.ood_quantile, sc.high_risk_specificity, sc.ood_neighbours)
    return (calibration, train_features) if calibration.model_id == model_id and same else None


def default_model_dir(cfg) -> Path:
    """``serve.model``, else RUN_DIR/models/best when a sweep chose one, else RUN_DIR/models/<train.name>."""
    if cfg.serve.model:
        return Path(cfg.serve.model)
    run_dir = local_run_dir(cfg.run)
    best = layout(run_dir).model(BEST_MODEL)
    return best if (best / MODEL_TRAINING).is_file() else layout(run_dir).model(cfg.train.name)


def load_served_model(model_dir: str | Path, sc: ServeConfig | None = None) -> ServedModel:
    """Load ``model_dir`` (a ``models/<name>`` directory) for serving, calibrating it on first use.

    Raises:
        ServeError: no trained model there, or no calibration and no run data to make one.
    """
    import timm.data

    from skinsynth.classify.evaluate import load_trained_model

    sc = sc or ServeConfig()
    model_dir = Path(model_dir)
    if not (model_dir / MODEL_TRAINING).is_file() or not (model_dir / MODEL_WEIGHTS).is_file():
        raise ServeError(
            f"no trained model at {model_dir} ({MODEL_TRAINING} and {MODEL_WEIGHTS}): run 'skinsynth train'"
        )
    model, info = load_trained_model(model_dir)
    card_path = model_dir / MODEL_CARD
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    data_cfg = timm.data.resolve_data_config({}, model=model)
    mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    model_id = weights_id(model_dir)
    saved = _read_calibration(model_dir, model_id, sc)
    if saved is not None:
        calibration, train_features = saved
        preprocess = section_from_dict(PreprocessConfig, calibration.preprocess)
    else:
        run_dir = _run_dir_of(model_dir, card)
        if run_dir is None:
            raise ServeError(
                f"{model_dir} has no serving calibration ({CALIBRATION_JSON}) and its run directory (with the "
                "validation split) was not found: serve it once from its run, or copy the calibration files with it"
            )
        data_card = json.loads(layout(run_dir).data_card.read_text())
        preprocess = section_from_dict(PreprocessConfig, data_card["preprocess"])
        calibration, train_features = calibrate(
            model, model_dir, run_dir, info["classes"], preprocess, card, sc, mean, std
        )
    return ServedModel(
        model=model.to(memory_format=torch.channels_last),  # NHWC: oneDNN's faster convolutions
        model_id=model_id,
        model_dir=model_dir,
        classes=list(info["classes"]),
        image_size=int(info["image_size"]),
        preprocess=preprocess,
        mean=mean,
        std=std,
        calibration=calibration,
        train_features=train_features.float(),  # stored in half precision; converted once, not per request
        card=card,
    )
