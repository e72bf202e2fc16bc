"""The classifier: timm models with offline pretrained weights, training, semi-supervised learning, metrics."""
