"""agora_jax: collaborating language models that distill into each other, in JAX."""
from setuptools import find_packages, setup

setup(
    name="agora_jax",
    version="0.1.0",
    description="Multi-LLM collaboration and group distillation (single-multi evolution, AGORA) in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["agora_jax", "agora_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "transformers>=5.0",
        "tokenizers>=0.21",
        "datasets>=3.0",
        "tensorflow-datasets>=4.9.9",
        "safetensors>=0.4",
        "gguf>=0.10",
        "sympy>=1.12",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # torch is the numerical reference in tests only; 2.13.0 resolves to a CPU build on the dev machines.
        "test": ["pytest>=8", "torch==2.13.0", "accelerate>=1.0", "nbformat>=5.9", "nbclient>=0.10", "ipykernel>=6.29",
                 "peft>=0.13", "pytest-xdist>=3.5"],
        # libtpu, to compile for TPU topologies on any host (launch/compile.py); jax's extra pins the matching
        # version (libtpu 0.0.42 for jax 0.10.2, a 213 MB wheel). Not for GPU machines.
        "tpu": ["jax[tpu]>=0.10"],
    },
)
