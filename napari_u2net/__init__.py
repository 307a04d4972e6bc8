"""napari-u2net: the napari plugin (widgets, reader/writer, sample data) over ``training``."""

from training import __version__

__all__ = ["__version__"]
