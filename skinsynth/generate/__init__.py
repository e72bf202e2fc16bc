"""The generator stage: a class-conditional diffusion model trained on the real train split, and sampling from it."""
