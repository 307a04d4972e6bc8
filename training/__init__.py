"""napari-u2net's torch-only core: the universal 3D U²-Net, model files, inference, training.

Nothing here imports Qt or napari, so researchers can train and predict on headless machines.
"""

__version__ = "0.1.0"
