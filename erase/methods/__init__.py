"""Erasure methods: one file each, all the same shape (a config dataclass + a class).

Trained methods (SDD, ESD, CA) give `loss(step, teacher)` to the shared trainer; closed-form methods (UCE, marked
subclasses of erase.methods.base.ClosedFormMethod) give `solve(weights)`. `erase run` asks which kind a method is; it
grows no branch per method. A method's own options are declared on its config (erase.methods.options).
"""

from erase.methods.ca import CA, CAConfig
from erase.methods.esd import ESD, ESDConfig
from erase.methods.sdd import SDD, SDDConfig
from erase.methods.uce import UCE, UCEConfig

METHODS = {"sdd": (SDD, SDDConfig), "esd": (ESD, ESDConfig), "ca": (CA, CAConfig), "uce": (UCE, UCEConfig)}
