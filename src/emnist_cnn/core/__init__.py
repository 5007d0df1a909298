"""Pure computation: augmentation, the model, the training step, error rates, choices on validation. No file I/O."""
