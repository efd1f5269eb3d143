"""Import path used by the seed documentation: ``from library.custom_hina_adamw_optimizer import HinaAdamWOptimizer``."""
from .optimizers.hina_adamw import HinaAdamW, HinaAdamWOptimizer

__all__ = ["HinaAdamWOptimizer", "HinaAdamW"]
