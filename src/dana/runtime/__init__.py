"""The distributed runtime: the simulator's rules as a real parameter server on Ray.

:func:`launch` runs a :class:`~dana.training.RunConfig` with K parameter-server shard
actors, N worker actors and an evaluator actor, on a local Ray instance or an existing
cluster, and writes the same ``result.json`` as ``dana run`` (plus throughput, the measured
lag histogram and per-worker update counts). Ray is an optional dependency: nothing here
imports it until a launch starts (``pip install 'dana[ray]'``).
"""

from dana.runtime.driver import MODEL, LaunchOptions, launch, require_ray
from dana.runtime.worker import Fault

__all__ = ["MODEL", "Fault", "LaunchOptions", "launch", "require_ray"]
