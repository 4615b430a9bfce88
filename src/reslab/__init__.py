"""reslab: build, train and study residual networks."""

__version__ = "0.1.0"
