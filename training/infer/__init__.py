"""Segmenting images: the pipeline, the sliding window, backends that run the network, post-processing."""
