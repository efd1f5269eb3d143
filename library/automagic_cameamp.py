"""Import path used by seed 003: ``from library.automagic_cameamp import Automagic_CameAMP``.

The optimizers live in ``library/optimizers/automagic.py``.
"""
from .optimizers.automagic import (
    Automagic_CameAMP,
    Automagic_CameAMP8bit,
    Automagic_CameAMP_COptim,
    Automagic_CameAMP_COptim8bit,
)

__all__ = ["Automagic_CameAMP", "Automagic_CameAMP8bit", "Automagic_CameAMP_COptim", "Automagic_CameAMP_COptim8bit"]
