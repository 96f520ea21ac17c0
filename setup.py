"""Installs `semvlp` and the Triton kernels (folder `kernels/`, import name `semvlp_kernels`).

The kernels folder is mapped to a distinct import name so that it never shadows the
unrelated PyPI package `kernels`, which transformers probes for at import time.
"""

from setuptools import find_packages, setup

setup(
    name="semvlp",
    version="0.1.0",
    description="A trainer for SemVLP vision-language pre-training (Li et al., 2021)",
    python_requires=">=3.10",
    packages=find_packages(include=["semvlp", "semvlp.*"]) + ["semvlp_kernels"],
    package_dir={"semvlp_kernels": "kernels"},
    install_requires=[
        # Any torch >= 2.4: GPU images keep the torch they ship (2.11 on one in use).
        "torch>=2.4",
        "deepspeed>=0.16",
        "triton>=3.0",
        "transformers>=4.45",
        "numpy",
        "h5py",
        "nvidia-ml-py",  # provides the `pynvml` module
        "tqdm",
        "safetensors",
        "tensorboard",
    ],
    extras_require={
        "uniter": ["lmdb", "msgpack"],  # `convert uniter-lmdb` only
        # ruff pinned: `make test` checks its formatting; msgpack-numpy writes UNITER's values in the tests;
        # psutil (also deepspeed's) follows the launcher's processes in the tests
        "dev": ["pytest", "ruff>=0.17,<0.18", "lmdb", "msgpack", "msgpack-numpy", "psutil"],
    },
)
