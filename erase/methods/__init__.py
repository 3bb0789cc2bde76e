"""Erasure methods: one file each, all the same shape (a config dataclass + a class with `loss`)."""

from erase.methods.sdd import SDD, SDDConfig

METHODS = {"sdd": (SDD, SDDConfig)}
