"""The dropout streams of the Triton kernels (kernels/philox.py): each kernel's keep mask is Philox
at the index its docstring names, checked against an implementation written here from the Philox
paper (Salmon et al., 2011) and Triton's documented uint-to-float mapping, not against the kernels'
own mask helpers; and unseeded calls draw fresh seeds from torch's generator.

The kernels' tests compare them with their references under the mask helpers' masks, which share
the kernels' index code: a mask that repeated across heads or calls would pass those.
"""

import numpy as np
import pytest
import torch

from semvlp_kernels.attention import attention, attention_dropout_mask
from semvlp_kernels.philox import philox_seed
from semvlp_kernels.residual_layer_norm import residual_dropout_mask

_MASK32 = 0xFFFFFFFF


def philox_uniform(seed: int, offsets: np.ndarray) -> np.ndarray:
    """Triton's tl.rand(seed, offsets) for int32 offsets: Philox-4x32-10 with counter (offset, 0, 0, 0)
    and key (seed, 0); the first output word, read as int32, folded onto [0, 2**31) and scaled to [0, 1)
    in fp32."""
    c0 = offsets.astype(np.uint64) & _MASK32
    c1 = c2 = c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & _MASK32), np.uint64(0)
    for _ in range(10):
        product_b, product_a = np.uint64(0xCD9E8D57) * c2, np.uint64(0xD2511F53) * c0  # < 2**64: exact
        c0, c1, c2, c3 = (
            (product_b >> 32) ^ c1 ^ k0,
            product_b & _MASK32,
            (product_a >> 32) ^ c3 ^ k1,
            product_a & _MASK32,
        )
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _MASK32, (k1 + np.uint64(0xBB67AE85)) & _MASK32
    x = c0.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


@pytest.mark.parametrize("seed", [0, 12345, 2**31 - 2])
def test_attention_keep_mask_is_philox_of_the_flat_index_of_each_probability(device, seed):
    """Position (b, h, i, j) of P [B, H, Tq, Tk] draws at (b*H + h)*Tq*Tk + i*Tk + j: every batch row,
    head and query its own numbers."""
    b, h, tq, tk, p = 2, 3, 21, 20, 0.3
    keep = attention_dropout_mask(b, h, tq, tk, p, seed, torch.device(device)).cpu().numpy()
    expected = philox_uniform(seed, np.arange(b * h * tq * tk)).reshape(b, h, tq, tk) >= np.float32(p)
    np.testing.assert_array_equal(keep, expected)
    heads = keep.reshape(b * h, tq * tk)
    assert len({row.tobytes() for row in heads}) == b * h  # no two (batch, head) pairs share a mask
    assert abs(keep.mean() - (1 - p)) < 0.03


def test_residual_keep_mask_is_philox_of_the_element_index(device):
    shape, p, seed = (7, 33), 0.1, 99
    keep = residual_dropout_mask(shape, p, seed, torch.device(device)).cpu().numpy()
    np.testing.assert_array_equal(keep, philox_uniform(seed, np.arange(7 * 33)).reshape(shape) >= np.float32(p))


def test_unseeded_calls_draw_fresh_reproducible_seeds(device):
    """Two layers (or two steps) without a seed get different seeds, hence different masks; the same
    torch seed gives the same ones (what activation checkpointing's recomputation relies on)."""
    torch.manual_seed(7)
    first = [philox_seed(0.1, None, torch.device(device)).item() for _ in range(4)]
    torch.manual_seed(7)
    again = [philox_seed(0.1, None, torch.device(device)).item() for _ in range(4)]
    assert first == again and len(set(first)) == 4
    assert philox_seed(0.0, None, torch.device(device)).numel() == 0  # no dropout: no seed to load


def test_two_unseeded_attention_calls_drop_differently(device):
    q, k, v = (torch.randn(1, 2, 20, 16, device=device) for _ in range(3))
    first, second = attention(q, k, v, dropout_p=0.5), attention(q, k, v, dropout_p=0.5)
    assert not torch.equal(first, second)
    torch.manual_seed(3)
    replay = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    torch.testing.assert_close(attention(q, k, v, dropout_p=0.5), replay, rtol=0, atol=0)
