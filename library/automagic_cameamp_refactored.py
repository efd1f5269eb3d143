"""Import path used by seed 004: ``from library.automagic_cameamp_refactored import create_lora_optimizer``.

The optimizer lives in ``library/optimizers/automagic_refactored.py``.
"""
from .optimizers.automagic_refactored import (
    OptimizerConfig,
    RefactoredAutomagicCameAMP,
    RegularizationStrategy,
    create_full_finetune_optimizer,
    create_lora_optimizer,
)

__all__ = [
    "OptimizerConfig",
    "RefactoredAutomagicCameAMP",
    "create_lora_optimizer",
    "create_full_finetune_optimizer",
    "RegularizationStrategy",
]
