"""A run's checkpoint as files PyTorch users load; the formats are listed in
:mod:`psa_jax.cli.export`."""

from __future__ import annotations

FORMATS = ("psalign", "diffusers-ip-adapter", "diffusers-unet", "peft-lora", "diffusers-pipeline")


def export_run(workdir: str, fmt: str, out: str, step: int | None = None) -> str:
    """Write run ``workdir`` in format ``fmt`` to ``out``; returns the file or folder written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    if fmt == "peft-lora":
        return _export_lora(workdir, out, step)
    if fmt == "diffusers-pipeline":
        if step is not None:
            raise ValueError("diffusers-pipeline exports a base run's newest checkpoint only")
        from psa_jax.export.pipeline import export_base_pipeline

        return export_base_pipeline(workdir, out)
    from psa_jax.models.psa_unet import PSAUNet
    from psa_jax.train.restore import load_run

    run = load_run(workdir, step, data=False)
    config = run.models.module.config  # a pretrained folder's, else the run's model.unet
    if fmt == "diffusers-unet":
        PSAUNet(config, run.unet_params).save_pretrained(out)
        return out
    if run.adapter is None:
        raise ValueError(f"{workdir} is not a dpo run: it has no adapter to export as {fmt}")
    width = run.adapter["user_proj"]["kernel"].shape[1]
    unet = PSAUNet(
        config,
        run.unet_params,
        adapter=run.adapter,
        num_user_tokens=width // config.cross_attention_dim,
    )
    return unet.save_adapter(out, format=fmt)


def _export_lora(workdir: str, out: str, step: int | None) -> str:
    from psa_jax.core.checkpoint import restore_host_params
    from psa_jax.train.lora import export_lora

    lora, config = restore_host_params(workdir, step)
    train = config.get("train", {})
    if config.get("task") != "denoise" or train.get("denoise_target") != "lora":
        raise ValueError(f"{workdir} is not a LoRA run (task {config.get('task')!r})")
    lcfg = train["lora"]
    return export_lora(lora, out, rank=int(lcfg["rank"]), alpha=float(lcfg["alpha"]))
