"""Flax models named like diffusers/transformers: UNet (+PSA adapter), CLIP text encoder, VAE."""
