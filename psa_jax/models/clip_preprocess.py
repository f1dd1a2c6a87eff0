"""transformers' ``CLIPImageProcessor`` in numpy + PIL: uint8 images -> CLIP ``pixel_values``.

Apart from the tower (``clip_vision.py``) because it is host-side numpy, not Flax, and is
configured by the CLIP folder's ``preprocessor_config.json`` rather than its weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (CLIPImageProcessor's defaults).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, transformers' PILImageResampling.BICUBIC


@dataclasses.dataclass(frozen=True)
class CLIPImagePreprocess:
    """transformers' ``CLIPImageProcessor`` on uint8 RGB images, in numpy + PIL.

    Resize (shortest edge to ``shortest_edge``, the other to ``int(s * long / short)``, PIL
    bicubic on uint8), center crop (top-left offset ``(size - crop) // 2``), ``x * 1/255`` in
    float64 then float32, ``(x - mean) / std`` in float32: the steps and roundings of its PIL
    backend (``CLIPImageProcessorPil``, the only backend without torchvision), so outputs match
    that backend to float32 rounding. transformers 5's default torchvision backend resizes float
    uint8 tensors with ``tvF.resize(antialias=True)``, which follows PIL's filter but may round
    some pixels one uint8 step apart (not tested: no torchvision here). OpenAI's CLIP (and so
    Q16) resizes with PIL, like this class.
    """

    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = _BICUBIC
    rescale_factor: float = 1 / 255

    @classmethod
    def from_config(cls, config: dict[str, Any] | None, image_size: int) -> CLIPImagePreprocess:
        """From ``preprocessor_config.json`` (None: CLIP's defaults at ``image_size``)."""
        if not config:
            return cls(image_size, (image_size, image_size))
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if config.get(flag) is False:
                raise ValueError(f"preprocessor_config.json sets {flag}=false: not supported")
        size = config.get("size", image_size)
        short = size.get("shortest_edge") if isinstance(size, dict) else size
        if not isinstance(short, int):
            raise ValueError(f"preprocessor_config.json: need size.shortest_edge, got {size!r}")
        crop = config.get("crop_size", short)
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        if max(crop) > short:
            raise ValueError(f"crop_size {crop} exceeds the resized shortest edge {short}")
        return cls(
            short,
            tuple(crop),
            tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
            tuple(config.get("image_std", OPENAI_CLIP_STD)),
            int(config.get("resample", _BICUBIC)),
            float(config.get("rescale_factor", 1 / 255)),
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> float32 ``pixel_values`` ``[N, 3, crop_h, crop_w]``."""
        from PIL import Image

        ch, cw = self.crop_size
        mean = np.asarray(self.image_mean, np.float32)
        std = np.asarray(self.image_std, np.float32)
        out = np.empty((len(images), ch, cw, 3), np.float32)
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            if w <= h:
                nh, nw = int(self.shortest_edge * h / w), self.shortest_edge
            else:
                nh, nw = self.shortest_edge, int(self.shortest_edge * w / h)
            if (nh, nw) != (h, w):
                image = np.asarray(Image.fromarray(image).resize((nw, nh), resample=self.resample))
            top, left = (nh - ch) // 2, (nw - cw) // 2
            x = image[top : top + ch, left : left + cw].astype(np.float64) * self.rescale_factor
            out[i] = (x.astype(np.float32) - mean) / std
        return out.transpose(0, 3, 1, 2)
