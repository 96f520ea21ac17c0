"""Fused operations for the SemVLP encoder (import name `semvlp_kernels`).

Each op lives in its own file with its Triton kernels, its autograd Function and a
pure-PyTorch `<op>_reference()`. `dispatch.select_ops` decides which implementation runs.
"""

if __name__ != "semvlp_kernels":
    # Run from the repository root, this folder is also importable as `kernels`, the name of an
    # unrelated PyPI package that transformers probes for. Refuse, so probes see "not installed".
    raise ImportError(f"this folder is the package `semvlp_kernels`, not {__name__!r}")

from semvlp_kernels.dispatch import KernelOps, select_ops

__all__ = ["KernelOps", "select_ops"]
