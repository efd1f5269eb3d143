"""Import path used by the seed documentation: ``from library.custom_hina_adaptive_adamw_optimizer import AdaptiveHinaAdamW``."""
from .optimizers.adaptive_hina import AdaptiveHinaAdamW

__all__ = ["AdaptiveHinaAdamW"]
