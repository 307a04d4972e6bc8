"""Training: the loop, whole runs, adapter-only adaptation, losses, sampling, augmentation, evaluation."""
