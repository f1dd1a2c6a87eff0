"""DPO beta x learning rate on the embedded tiny world (4 runs of 800 steps, ~5 CPU min each).

psa-jax sweep configs/sweeps/tiny_beta_lr.py --out runs/sweep_beta_lr
psa-jax sweep-report --sweep runs/sweep_beta_lr
"""


def get_sweep():
    return {
        "config": "configs/tiny.py",
        "grid": {"train.beta": [1000.0, 5000.0], "optim.learning_rate": [1e-3, 2e-3]},
    }
