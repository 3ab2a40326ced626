"""Training: datasets, synthetic data, augmentations, the paper's losses and the training loop."""
