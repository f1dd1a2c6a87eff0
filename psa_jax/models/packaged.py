"""Model folders shipped inside the package, named in configs as ``packaged:<name>``.

``packaged:tiny-base`` is the embedded default's base: a diffusers StableDiffusionPipeline folder
(UNet, CLIP text encoder, VAE, word tokenizer, DDIM scheduler) trained by ``launch/tiny.sh`` on
the Sage-mini world; its ``recipe.json`` says with which configs, seeds and world version. A
config names it explicitly (``model.pretrained = "packaged:tiny-base"``), so no run picks up
shipped weights the user did not ask for.
"""

from __future__ import annotations

import os

from psa_jax.core.errors import PsaJaxError

PREFIX = "packaged:"
FOLDERS = {"tiny-base": "tiny_base"}
TINY_BASE = PREFIX + "tiny-base"


class PackagedModelError(PsaJaxError, FileNotFoundError):
    """A ``packaged:`` name that the package does not ship (or whose files are missing)."""


def resolve(path: str) -> str:
    """``packaged:<name>`` -> the shipped folder; any other path is returned expanded."""
    if not path.startswith(PREFIX):
        return os.path.expanduser(path)
    name = path[len(PREFIX) :]
    if name not in FOLDERS:
        raise PackagedModelError(
            f"{path!r}: no packaged model {name!r}; shipped: {sorted(FOLDERS)}"
        )
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), FOLDERS[name])
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise PackagedModelError(
            f"{path!r}: {folder} holds no model_index.json; the package was installed without "
            "its model files (reinstall, or rebuild them with launch/tiny.sh)"
        )
    return folder
