"""Example measureflow plugin package: the damped spiral field."""

__version__ = "0.2.0"
