"""PSA ablations on SD1.5 (PSAlign's recipe otherwise): user tokens x user scale, each on a
SLURM GPU node or a TPU slice. Set the folders first (or pass them in `overrides`):

    psa-jax sweep configs/sweeps/sd15_ablation.py --out /shared/sweeps/sd15 --mode slurm \
        --sbatch-arg=--gpus=8 --submit
"""

FOLDERS = {
    "model.pretrained": "/data/models/stable-diffusion-v1-5",
    "data.source": "/data/sage",
    "data.embeddings": "/data/sage_embeddings",
    "data.users_csv": "/data/sage/users.csv",
}


def get_sweep():
    return {
        "config": "configs/sd15.py",
        "overrides": FOLDERS,
        "grid": {"model.adapter.num_user_tokens": [1, 4], "model.adapter.user_scale": [0.5, 1.0]},
    }
