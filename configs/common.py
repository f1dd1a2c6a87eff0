"""Pieces shared by every config: mesh, logical-axis rules, adapter defaults.

Modules name their weight axes logically ("embed", "heads", "mlp", "conv_out", ...); these rules
say which mesh axis each one is sharded over (MaxText style). Change sharding here, not in code.
"""

import ml_collections


def mesh_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            # -1: all remaining devices. data x fsdp x tensor must equal the device count.
            "shape": {"data": -1, "fsdp": 1, "tensor": 1},
            "logical_axis_rules": [
                ["act_batch", ["data", "fsdp"]],
                ["embed", "fsdp"],
                ["heads", "tensor"],
                ["mlp", "tensor"],
                ["conv_in", None],
                ["conv_out", "tensor"],
                ["norm", None],
                ["user_embed", None],
                ["vocab", None],
            ],
        }
    )


def adapter_config(user_embed_dim: int, num_user_tokens: int = 1) -> ml_collections.ConfigDict:
    """PSA adapter: profile embedding size D, user tokens T, default scale."""
    return ml_collections.ConfigDict(
        {
            "user_embed_dim": user_embed_dim,
            "num_user_tokens": num_user_tokens,
            "user_scale": 1.0,
        }
    )
