"""VNA: an open vendor neutral archive for medical images."""

__version__ = "0.1.0"
