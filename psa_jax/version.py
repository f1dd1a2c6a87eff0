"""The package version, importable from every layer (``psa_jax/__init__`` imports the models)."""

__version__ = "0.1.0"
