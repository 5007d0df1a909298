"""Pure computation: augmentation, the model, error rates, choices on validation. No file I/O."""
