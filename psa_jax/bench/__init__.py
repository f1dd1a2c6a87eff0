"""``psa-jax bench``: psa_jax's Diffusion-DPO step and sampler against PyTorch, in one process.

Contestants, on the same random weights, shapes, batch and dtype:

* ``psa_jax`` -- the real train step (``train/step.py``) as ``psa-jax train`` compiles it
  (:mod:`~psa_jax.bench.jax_train`); for sampling, ``Pipeline``.
* ``torch-psalign`` -- one step of PSAlign's ``train.py``: a second full reference UNet, VAE
  and text encoders run every step (:mod:`~psa_jax.bench.torch_train`).
* ``torch-fair`` -- a careful PyTorch step: cached latents and text states, one UNet whose
  reference is the adapter off, SDPA, ``torch.compile`` where it works.

Layout: :mod:`~psa_jax.bench.shapes` (architectures, random weights), :mod:`~psa_jax.bench.flops`
(analytic FLOPs), :mod:`~psa_jax.bench.measure` (timing, memory, peaks),
:mod:`~psa_jax.bench.torch_models` (PSA processors), :mod:`~psa_jax.bench.sample`,
:mod:`~psa_jax.bench.report` (rows, table, JSON), :mod:`~psa_jax.bench.run` (the driver).

The names below are import-free so that building the command line stays fast.
"""

SHAPE_NAMES = ("tiny", "sd15-256", "sd15", "sdxl", "tiny-xl")
CONTESTANTS = ("psa_jax", "torch-psalign", "torch-fair")
WHATS = ("train", "sample")
