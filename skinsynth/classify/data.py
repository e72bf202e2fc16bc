"""Classifier inputs: dermoscopy augmentation and the collation of shard batches into normalised tensors.

The shards hold PNG bytes (read with :mod:`skinsynth.core.shards`); decoding and augmentation happen in the training
workers (``Collate``), so the object store only ever carries compressed images.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from skinsynth.core.shards import decode_png_arrays, decode_pngs, normalise, to_model_input
from skinsynth.data.schema import TONES

TONE_INDEX = {tone: i for i, tone in enumerate(TONES)}  # Collate(with_tones=True): tone name -> tensor value


class DermoscopyAugmentation:
    """Per-image augmentation for dermoscopy (Perez et al. 2018, "Data augmentation for skin lesion analysis").

    Lesions have no up or left, so all flips and rotations are label-preserving; a random resized crop (scale
    0.7-1) varies framing and size; mild brightness, contrast, saturation and hue jitter covers device differences
    that colour constancy leaves. Crop, rotation and flips are composed into one affine matrix and applied with a
    single ``cv2.warpAffine`` per image (reflected borders, so rotated corners hold skin rather than black), and
    the colour jitter is one 3x3 matrix per image applied to the whole batch at once: much less CPU time than the
    equivalent chain of torchvision transforms (docs/results.md), time the model gets instead.

    Draws come from a seeded generator, so a given seed and batch order give the same augmented images.
    """

    def __init__(
        self,
        size: int,
        seed: int | tuple[int, ...] = 0,
        scale: tuple[float, float] = (0.7, 1.0),
        ratio: tuple[float, float] = (0.9, 1.1),
        rotate_p: float = 0.5,
        jitter: float = 0.1,
        hue: float = 0.02,
    ):
        self.size, self.scale, self.ratio, self.rotate_p = size, scale, ratio, rotate_p
        self.jitter, self.hue = jitter, hue
        self.rng = np.random.default_rng(seed)

    def geometry(self, height: int, width: int) -> np.ndarray:
        """A 2x3 matrix mapping output pixels onto a random crop of a (height, width) image, rotated and flipped."""
        rng = self.rng
        area = rng.uniform(*self.scale) * height * width
        aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        crop_w = min(width, math.sqrt(area * aspect))
        crop_h = min(height, math.sqrt(area / aspect))
        cx = rng.uniform(crop_w / 2, width - crop_w / 2)
        cy = rng.uniform(crop_h / 2, height - crop_h / 2)
        angle = rng.uniform(-math.pi, math.pi) if rng.random() < self.rotate_p else 0.0
        flip_x = -1.0 if rng.random() < 0.5 else 1.0
        flip_y = -1.0 if rng.random() < 0.5 else 1.0
        # output pixel index (u, v) -> centred, flipped, scaled to the crop, rotated, moved to the crop centre;
        # (cx, cy) are continuous coordinates (pixel i spans [i, i + 1]), hence the half-pixel terms
        scale = np.diag([flip_x * crop_w / self.size, flip_y * crop_h / self.size])
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        linear = rotation @ scale
        offset = np.array([cx, cy]) - 0.5 - linear @ np.full(2, self.size / 2 - 0.5)
        return np.hstack([linear, offset[:, None]])

    def colour(self) -> tuple[np.ndarray, float]:
        """A 3x3 RGB matrix (brightness, saturation, hue rotation in YIQ space) and a contrast factor."""
        rng = self.rng
        brightness, saturation, contrast = rng.uniform(1 - self.jitter, 1 + self.jitter, size=3)
        theta = rng.uniform(-self.hue, self.hue) * 2 * math.pi
        c, s = math.cos(theta), math.sin(theta)
        to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        in_yiq = np.array([[1.0, 0, 0], [0, saturation * c, -saturation * s], [0, saturation * s, saturation * c]])
        return brightness * np.linalg.inv(to_yiq) @ in_yiq @ to_yiq, float(contrast)

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 RGB images (H, W, 3), any sizes -> augmented float tensor (N, 3, size, size) in [0, 1]."""
        warped, matrices, contrasts = [], [], []
        for image in images:
            forward = self.geometry(*image.shape[:2])
            warped.append(
                cv2.warpAffine(
                    image,
                    forward,
                    (self.size, self.size),
                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                    borderMode=cv2.BORDER_REFLECT_101,
                )
            )
            matrix, contrast = self.colour()
            matrices.append(matrix)
            contrasts.append(contrast)
        x = torch.from_numpy(np.stack(warped)).permute(0, 3, 1, 2).float().div_(255.0)
        x = torch.einsum("nij,njhw->nihw", torch.tensor(np.stack(matrices), dtype=x.dtype), x)
        grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).mean((1, 2)).view(-1, 1, 1, 1)
        contrast = torch.tensor(contrasts, dtype=x.dtype).view(-1, 1, 1, 1)
        return (contrast * x + (1 - contrast) * grey).clamp_(0.0, 1.0)


class Collate:
    """Ray Data numpy batch -> (normalised images, labels[, tones]); augmentation is drawn per image.

    With ``with_tones`` the batch must hold the ``tone`` column, returned as a third tensor of indices into
    ``TONES`` (-1: unknown): tensors, so that Ray's device transfer passes them like the labels.
    """

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: DermoscopyAugmentation | None = None,
        with_tones: bool = False,
    ):
        self.mean, self.std, self.augment, self.with_tones = mean, std, augment, with_tones

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        labels = torch.as_tensor(np.asarray(batch["label"], dtype=np.int64))
        if self.augment is None:
            images = to_model_input(decode_pngs(batch["image"]), self.mean, self.std)
        else:
            images = normalise(self.augment(decode_png_arrays(batch["image"])), self.mean, self.std)
        if not self.with_tones:
            return images, labels
        return images, labels, torch.tensor([TONE_INDEX.get(tone, -1) for tone in batch["tone"]], dtype=torch.int64)
