"""Hardware targets as data: ``TARGETS`` registry, ``get_target``, the ``Target`` record.

Importing this package registers every target module (loihi2, loihi2-sim, float).
"""
from hw_targets.base import TARGETS, Target, get_target, register, registered
from hw_targets import loihi2, ideal  # noqa: F401  (registers the targets)

__all__ = ["TARGETS", "Target", "get_target", "register", "registered"]
