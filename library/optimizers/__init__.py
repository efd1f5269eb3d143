"""The optimizer engine, its techniques and the presets built from them."""
__version__ = "1.0.0"
