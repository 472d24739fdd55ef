"""invalgw: a multi-region cache-invalidation gateway for Redis."""

__version__ = "0.1.0"
