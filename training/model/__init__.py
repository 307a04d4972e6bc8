"""The network and its files: the U²-Net, model files and their layout, the model registry, domain matching."""
