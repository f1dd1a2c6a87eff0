"""What the demo prints: known library noise dropped, everything else kept."""

from __future__ import annotations

import logging
import re

# Library log lines that say nothing to a demo user: orbax restating a read-only checkpoint
# manager's options every time a run is loaded for sampling, and transformers' and diffusers'
# remarks while the export stage loads the round-trip pipeline (torchvision absent, no image
# encoder, dtype casting). Everything else still prints.
_NOISE = (
    re.compile(r"^CheckpointManagerOptions\.read_only=True"),
    re.compile(r"^Given directory is read only="),
    re.compile(r"requires torchvision \(not installed\)"),
    # diffusers: the round trip passes the user embedding itself (no image encoder), in fp32.
    re.compile(r"^image_encoder is not loaded since `image_encoder_folder=None`"),
    re.compile(r"^There are modules in UNet2DConditionModel that should be kept in float32"),
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p.search(msg) for p in _NOISE)


def quiet_library_noise() -> None:
    """Attach :class:`_DropNoise` to absl's logger (orbax logs through it) and turn off
    TFDS's and transformers' loading bars (TFDS's show temporary-folder paths; the demo's own
    stage lines and bars say what is happening)."""
    import tensorflow_datasets as tfds
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    tfds.disable_progress_bar()
    hf_logging.disable_progress_bar()  # "Loading weights" of the profile encoder
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" (round trip)
    # absl logs to its own logger; transformers' and diffusers' modules log to children of
    # their root loggers, whose records only those loggers' handlers see (a logger's filters
    # skip records from its children).
    targets = [logging.getLogger("absl"), *logging.getLogger("transformers").handlers,
               *logging.getLogger("diffusers").handlers]  # fmt: skip
    for target in targets:
        if not any(isinstance(f, _DropNoise) for f in target.filters):
            target.addFilter(_DropNoise())
