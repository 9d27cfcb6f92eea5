"""txl: a Transformer-XL language-model training pipeline."""

__version__ = "0.1.0"
