"""The seed the dropout kernels key their Philox streams with (attention, varlen attention,
residual LayerNorm).

It travels as a one-element int32 tensor on the kernel's device, which the kernel loads, rather
than as a Python int: drawing it then needs no `.item()`, so eager mode never waits for the
device and torch.compile traces every dropout call into its graph instead of breaking there.
"""

from __future__ import annotations

import torch


def philox_seed(dropout_p: float, seed: int | None, device: torch.device) -> torch.Tensor:
    """[1] int32 on `device`: `seed` if given (tests and the keep-mask helpers, which load it
    whatever dropout_p; a host-to-device copy), else drawn from torch's generator for the device
    (reproducible under torch.manual_seed). Without dropout and seed the kernels read no seed: an
    empty tensor."""
    if seed is not None:
        return torch.tensor([seed], dtype=torch.int32, device=device)
    if dropout_p == 0.0:
        return torch.empty(0, dtype=torch.int32, device=device)
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int32, device=device)


def stream_positions_fit(draws: int) -> bool:
    """Whether a kernel's `draws` dropout draws have Philox stream positions: each is keyed by its
    element's flat index as an int32."""
    return draws < 2**31
