"""invalgw: a multi-region cache-invalidation gateway for Redis.

Producers in Python write::

    from invalgw import Invalidator          # or SyncInvalidator, with a blocking client

    await Invalidator(redis_client).invalidate("user:1001:profile", "user:1001:perms")

The wire format is :mod:`invalgw.proto`; the gateway itself runs as ``invalgw run``.
"""

from invalgw.producer import Invalidator, SyncInvalidator

__version__ = "0.1.0"

__all__ = ["Invalidator", "SyncInvalidator", "__version__"]
