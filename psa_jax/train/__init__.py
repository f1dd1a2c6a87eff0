"""Training: Diffusion-DPO for PSA adapters and plain denoising (base pretraining, LoRA)."""
