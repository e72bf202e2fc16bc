"""Semi-supervised learning from the train split's unlabelled pool: FixMatch and a pseudo-labelling baseline.

FixMatch (Sohn et al. 2020, "FixMatch: simplifying semi-supervised learning with consistency and confidence"): the
model's prediction on a weakly augmented view (flip + crop) of an unlabelled image becomes a hard pseudo-label when
its confidence reaches ``threshold``; the model is then trained to predict that label on a strongly augmented view
(RandAugment, Cubuk et al. 2020, then Cutout, DeVries & Taylor 2017). The unlabelled loss is averaged over the whole
unlabelled batch, so it grows as more predictions become confident.

With HAM10000's 58:1 imbalance, confident predictions are mostly the majority class. Distribution alignment
(Berthelot et al. 2020, "ReMixMatch") rescales each weak-view prediction by the ratio of the labelled class prior to
the running mean of the model's predictions on unlabelled data before thresholding, which keeps minority classes
from vanishing from the pseudo-labels.

Pseudo-labelling (Lee 2013, "Pseudo-label: the simple and efficient semi-supervised learning method") is the
baseline: the confident prediction on a weak view is the target for that same view, with no strong augmentation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from skinsynth.classify.data import DermoscopyAugmentation
from skinsynth.core.shards import decode_png_arrays, normalise


def fixmatch_loss(
    logits_weak: torch.Tensor,
    logits_strong: torch.Tensor,
    threshold: float,
    alignment: DistributionAlignment | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The FixMatch unlabelled loss (Sohn et al. 2020, eq. 4).

    Args:
        logits_weak: (N, C) logits on the weak views; no gradient flows through the pseudo-labels.
        logits_strong: (N, C) logits on the strong views of the same images.
        threshold: confidence (max softmax probability) a pseudo-label needs.
        alignment: optional distribution alignment applied to the weak-view probabilities first.

    Returns:
        The loss (mean over all N images, masked ones counting as 0) and the mask (1 = used) of shape (N,).
    """
    if logits_weak.shape != logits_strong.shape or logits_weak.ndim != 2:
        shapes = f"{tuple(logits_weak.shape)} and {tuple(logits_strong.shape)}"
        raise ValueError(f"weak and strong logits must both be (N, C), got {shapes}")
    probs = torch.softmax(logits_weak.detach().float(), dim=1)
    if alignment is not None:
        probs = alignment(probs)
    confidence, pseudo_labels = probs.max(dim=1)
    mask = (confidence >= threshold).float()
    per_image = F.cross_entropy(logits_strong.float(), pseudo_labels, reduction="none")
    return (per_image * mask).mean(), mask


def pseudo_label_loss(
    logits: torch.Tensor, threshold: float, alignment: DistributionAlignment | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pseudo-labelling loss (Lee 2013): cross-entropy against the model's own confident hard predictions.

    Args:
        logits: (N, C) logits on weak views of unlabelled images (with gradient).
        threshold: confidence a prediction needs to count.
        alignment: optional distribution alignment of the predictions before thresholding.

    Returns:
        The loss (mean over all N images) and the mask of used images.
    """
    probs = torch.softmax(logits.detach().float(), dim=1)
    if alignment is not None:
        probs = alignment(probs)
    confidence, pseudo_labels = probs.max(dim=1)
    mask = (confidence >= threshold).float()
    return (F.cross_entropy(logits.float(), pseudo_labels, reduction="none") * mask).mean(), mask


class DistributionAlignment:
    """ReMixMatch's distribution alignment (Berthelot et al. 2020): ``p <- normalise(p * prior / running_mean)``.

    Args:
        prior: the labelled set's class distribution (C,), the target the pseudo-labels are steered towards.
        momentum: weight of the history in the running mean of predicted distributions (0.999 in ReMixMatch's code
            amounts to about the last thousand batches; small runs want less).
    """

    def __init__(self, prior: torch.Tensor, momentum: float = 0.99):
        prior = torch.as_tensor(prior, dtype=torch.float32)
        if prior.ndim != 1 or (prior < 0).any() or prior.sum() <= 0:
            raise ValueError("the class prior must be a non-negative vector with a positive sum")
        self.prior = prior / prior.sum()
        self.running = self.prior.clone()
        self.momentum = momentum

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        """Update the running mean with this batch, then return the aligned, renormalised probabilities."""
        prior = self.prior.to(probs.device)
        self.running = self.running.to(probs.device)
        self.running = self.momentum * self.running + (1 - self.momentum) * probs.mean(dim=0)
        aligned = probs * prior / self.running.clamp_min(1e-6)
        return aligned / aligned.sum(dim=1, keepdim=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"running": self.running.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.running = state["running"].clone()


class StrongAugmentation:
    """FixMatch's strong view: RandAugment (two random ops at a fixed magnitude) then one Cutout square.

    torchvision's RandAugment draws one op sequence per call, so it is called per image: every image gets its own.
    """

    def __init__(self, magnitude: int, cutout: float, seed: int | tuple[int, ...] = 0):
        from torchvision.transforms import v2

        self.randaugment = v2.RandAugment(num_ops=2, magnitude=magnitude)
        self.cutout = cutout
        self.rng = np.random.default_rng(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float in [0, 1], each image with its own ops and Cutout square (grey fill)."""
        out = torch.stack([self.randaugment(image) for image in images]).float().div_(255.0)
        height, width = out.shape[-2:]
        for image in out:
            side = int(self.rng.uniform(0.0, self.cutout) * min(height, width))
            if side == 0:
                continue
            y, x = self.rng.integers(0, height), self.rng.integers(0, width)
            image[:, max(0, y - side // 2) : y + side - side // 2, max(0, x - side // 2) : x + side - side // 2] = 0.5
        return out


def weak_augmentation(size: int, seed: int | tuple[int, ...]) -> DermoscopyAugmentation:
    """FixMatch's weak view: random flips and a random crop (no rotation, no colour change)."""
    return DermoscopyAugmentation(size, seed=seed, scale=(0.75, 1.0), rotate_p=0.0, jitter=0.0, hue=0.0)


class UnlabelledCollate:
    """Ray Data batch of unlabelled rows (``image`` only: the pool carries no label column) -> the model's views.

    Returns ``(weak,)`` for pseudo-labelling and ``(weak, strong)`` for FixMatch, both normalised for the model.
    """

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        size: int,
        seed: int | tuple[int, ...],
        strong: StrongAugmentation | None = None,
    ):
        self.mean, self.std, self.strong = mean, std, strong
        self.weak = weak_augmentation(size, seed)
        self.strong_geometry = weak_augmentation(size, (*np.atleast_1d(seed).tolist(), 1)) if strong else None

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        if "label" in batch:
            raise RuntimeError("the unlabelled pool reached training with a label column; labels must stay hidden")
        arrays = decode_png_arrays(batch["image"])
        weak = normalise(self.weak(arrays), self.mean, self.std)
        if self.strong is None:
            return (weak,)
        # the strong view starts from its own flip and crop, like FixMatch's (which applies weak then strong)
        geometric = self.strong_geometry(arrays).mul_(255.0).round_().to(torch.uint8)
        return weak, normalise(self.strong(geometric), self.mean, self.std)
