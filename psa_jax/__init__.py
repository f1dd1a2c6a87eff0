"""psa_jax: Personalized Safety Alignment (PSA) for text-to-image diffusion in JAX/Flax.

Data flow: data -> models -> train -> sample -> eval -> export. The public surface is
``load_unet`` / ``load_text_encoder`` / ``load_vae`` and the ``psa-jax`` command line.
"""

from psa_jax.models.convert import WeightMismatchError
from psa_jax.models.psa_unet import PSAUNet, load_unet
from psa_jax.version import __version__

__all__ = [
    "PSAUNet",
    "WeightMismatchError",
    "__version__",
    "load_text_encoder",
    "load_unet",
    "load_vae",
]


def __getattr__(name):
    # The text encoder and VAE import lazily so that `import psa_jax` stays light.
    if name == "load_text_encoder":
        from psa_jax.models.clip import load_text_encoder

        return load_text_encoder
    if name == "load_vae":
        from psa_jax.models.vae import load_vae

        return load_vae
    raise AttributeError(f"module 'psa_jax' has no attribute {name!r}")
