"""Exporters: PSA adapters and base weights to PSAlign and diffusers layouts."""
