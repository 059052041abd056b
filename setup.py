"""kdscale: distributed pretraining distillation for LLMs.

`install_requires` holds the ranges the code needs. The `cpu` extra is the one place where the
tested CPU environment is pinned exactly (`make install` uses it). The `gpu` extra adds
Transformer Engine, which must never be installed on a CPU machine: even its meta package
breaks `import megatron.core`.
"""

from setuptools import find_packages, setup

# The tested CPU environment (Python 3.11; megatron-core 0.17+ needs Python 3.12).
CPU_PINS = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "deepspeed==0.19.8",
    "ray[default]==2.60.0",
    "webdataset==1.0.2",
    "wandb==0.31.0",
    "transformers==5.14.1",
    "accelerate==1.15.0",
    "gguf==0.19.0",
    "pydantic==2.14.3",
    "zstandard==0.25.0",
    "numpy==2.4.6",
    "pyarrow==26.0.1",
    "tokenizers==0.22.2",
    "safetensors==0.8.0",
    "matplotlib==3.11.2",
    "tqdm==4.70.1",
    "pyyaml==6.0.3",
]

setup(
    name="kdscale",
    version="0.1.0",
    description="Distributed pretraining distillation: Ray teacher-logit cache, megatron-core "
    "students, Minitron prune-then-distill.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kdscale", "kdscale.*"]),
    package_data={"kdscale": ["py.typed", "launch_templates/*"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.17",
        "webdataset>=1.0",
        "ray[default]>=2.40",
        "wandb>=0.19",
        "transformers>=4.57",
        "accelerate",
        "gguf",
        "safetensors",
        "pydantic>=2.6,<3",
        "pyyaml>=6",
        "tqdm>=4.66",
        "zstandard>=0.22",
        "pyarrow>=14",
        "numpy>=1.26",
        "matplotlib>=3.8",
    ],
    extras_require={
        "cpu": CPU_PINS,
        "deepspeed": ["deepspeed>=0.16"],
        "gpu": ["transformer-engine[pytorch]"],
        "dev": ["pytest==9.2.0", "pytest-timeout==2.4.0", "hypothesis==6.170.15"],
    },
    entry_points={"console_scripts": ["kdscale=kdscale.cli:main"]},
)
