"""Data for training: MSD datasets, preprocessing, normalisation, synthetic phantoms, the MNI152 template."""
