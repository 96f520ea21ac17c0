"""Benchmark the fused kernels against eager PyTorch (and every SDPA backend for attention).

    python benchmarks/fused_ops.py                     # GPU: base shapes, batch 64, bf16
    python benchmarks/fused_ops.py --quick             # fewer shapes, shorter timing (~30 s on H100)
    python benchmarks/fused_ops.py --out DIR           # JSON goes to DIR (default benchmarks/results)
    python benchmarks/fused_ops.py --profile           # + <json>_profile.txt: a torch.profiler table per case
    python benchmarks/fused_ops.py                     # CPU: tiny shapes, reference providers only

One JSON file: meta (device, torch/triton/CUDA versions, git commit, dtype, batch) + the measured
device-to-device copy bandwidth + one row per (op, case, provider, mode) with p50/p20/p80 ms
(triton.testing.do_bench on CUDA; wall time, so host launch overhead counts: the small fused ops'
forward + backward took 0.3-0.6 ms on an H100, well above their bytes' worth, and host_ms and
device_ms below say which side that is; CUDA-graph timing was tried and dropped because a failed
backward capture poisons the process),
host_ms (host time per call, calls back to back: above p50 the op is launch-bound at that size),
on CUDA device_ms (the GPU's kernel time per call, from the profiler: benchmarks/device_time.py;
what the op costs inside a step where the host runs ahead, and what the bandwidth targets are about),
GB/s for the memory-bound ops (bytes moved / p50, and device_GBps = bytes moved / device_ms,
counted as in tutorial 05: inputs read + outputs written, forward and backward), TFLOP/s for attention
(tutorial 06: 4*B*H*Tq*Tk*D forward, x3.5 for forward+backward) and the GEMM ops (2*M*K*N forward,
x3 for forward+backward), on CUDA peak_mb (one call's peak, its inputs included, measured in an
untimed call of its own: the timer's L2-flush buffer does not count), and the max abs
difference against the fp32 reference checked once before timing (none with dropout: random).
Every op/provider runs in its own try/except: a failure is recorded in its row and the rest still
run. On CUDA the JSON also holds what Triton chose: `autotune` (per kernel and tuning key the
chosen config and every config's time) and `compiled` (each compiled variant's registers, spill
bytes and shared memory as loaded on the device).

Shapes follow the model (DESIGN.md 1): base preset (12 heads x 64, hidden 768, FFN 3072),
single-stream 121 tokens (101 visual + 20 text), two-stream 101 visual / 20 text, cross-attention
101 x 20, and single-stream with pre-training's attention dropout 0.1; packed (varlen) attention
over captions of 8..20 tokens, and over single-stream sequences of 101 image tokens + those
captions, vs the same padded; masked LM on 15% of 20 text tokens.

Two kinds of comparison for the elementwise fusions, on the same rows (batch x 121 tokens):
  bias_gelu, residual_layer_norm: the op alone, the Triton kernel vs the same math in eager ops
    (gelu(x + b); LayerNorm(residual + dropout(x + b))), bias pass included. These are
    memory-bound: GB/s and % of copy bandwidth are about them (issue #6: at least 1.3x eager and
    70% of copy). The model's eager path never runs this baseline: it adds the bias in the GEMM.
  linear_gelu, linear_residual_layer_norm: what the model dispatches (semvlp_kernels.dispatch),
    GEMM included: "triton" = bias-free F.linear + the fused kernel (linear_*_triton), "eager" =
    F.linear with the bias in cuBLAS's epilogue + the eager ops (linear_*_eager). Their speedup is
    what kernel_backend "triton" gains or loses per fusion site in a training step: the FFN
    up-projection 768 -> 3072 and down-projection 3072 -> 768 with pre-training's dropout 0.1;
    without --quick also the down-projection without dropout (checked against fp32) and the
    attention output projection 768 -> 768. TFLOP/s counts the GEMMs; no GB/s (not memory-bound).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_time import device_ms  # noqa: E402


def _git_commit() -> str:
    if os.environ.get("SEMVLP_GIT_COMMIT"):
        return os.environ["SEMVLP_GIT_COMMIT"]
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


class Timer:
    """do_bench on CUDA; a plain wall-clock loop on CPU (do_bench needs CUDA events)."""

    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.warmup, self.rep = (5, 20) if quick else (25, 100)

    def __call__(self, fn, grad_to_none=None) -> tuple[float, float, float]:
        if self.device.type == "cuda":
            import triton.testing

            return tuple(
                triton.testing.do_bench(
                    fn, warmup=self.warmup, rep=self.rep, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]
                )
            )
        times = []
        fn()
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        return times[1], times[0], times[2]


def copy_bandwidth(device: torch.device, timer: Timer) -> float | None:
    """Device-to-device copy GB/s (read + write), the roofline for the memory-bound ops."""
    if device.type != "cuda":
        return None
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))[0]
    return 2 * src.numel() / ms / 1e6


# ---------------------------------------------------------------- per-op setups
# Each setup returns (inputs: list of leaf tensors, providers: {name: fn(*inputs) -> tensor},
# reference: fn(*inputs) -> fp32 tensor (None when the outputs are random: dropout), bytes_fwd,
# bytes_bwd, (flops_fwd, flops_fwd_bwd) or None).


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def setup_attention(device, dtype, batch, heads, head_dim, tq, tk, lengths, providers, dropout_p=0.0):
    from semvlp_kernels.attention import attention, attention_reference

    # Leaves must be the [B, T, H, D] tensors, so build them first and view inside.
    raw = [_leaf(torch.randn(batch, t, heads, head_dim, device=device, dtype=dtype)) for t in (tq, tk, tk)]
    mask = None
    if lengths is not None:
        mask = (
            torch.arange(tk, device=device)[None, :] < torch.tensor(lengths, device=device).repeat(batch)[:batch, None]
        )

    def views(q, k, v):
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def sdpa_with(backend):
        from torch.nn.attention import sdpa_kernel

        def fn(q, k, v):
            with sdpa_kernel(backend):
                m = None if mask is None else mask[:, None, None, :]
                return F.scaled_dot_product_attention(*views(q, k, v), attn_mask=m, dropout_p=dropout_p)

        return fn

    table = {
        "triton": lambda q, k, v: attention(*views(q, k, v), mask, dropout_p),
        "eager": lambda q, k, v: attention_reference(*views(q, k, v), mask, dropout_p),
    }
    try:
        from torch.nn.attention import SDPBackend

        for name, backend in (
            ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa_cudnn", getattr(SDPBackend, "CUDNN_ATTENTION", None)),
            ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("sdpa_math", SDPBackend.MATH),
        ):
            if backend is not None:
                table[name] = sdpa_with(backend)
    except ImportError:
        pass
    table = {k: v for k, v in table.items() if k in providers}
    reference = lambda q, k, v: attention_reference(*(t.float() for t in views(q, k, v)), mask)
    if dropout_p > 0.0:  # random outputs: nothing to check them against
        reference = None
    flops = 4 * batch * heads * tq * tk * head_dim
    flops = (flops, 3.5 * flops)  # 06: the backward is 2.5x the forward
    size = torch.finfo(dtype).bits // 8
    bytes_fwd = size * batch * heads * head_dim * (2 * tq + 2 * tk)  # read q, k, v; write out
    return raw, table, reference, bytes_fwd, 2 * bytes_fwd, flops


def setup_varlen_attention(device, dtype, batch, heads, head_dim, lengths, providers):
    """Packed text ([total, H, D] + cu_seqlens) through the varlen kernel vs the same tokens
    padded to the longest: the padded providers pay pad + unpad around the padded kernel, the
    cost a packed model would pay to call it (on today's padded activations they would not)."""
    from semvlp_kernels.attention import attention, attention_reference
    from semvlp_kernels.varlen_attention import check_cu_seqlens, varlen_attention, varlen_attention_reference

    total, max_len = sum(lengths), max(lengths)
    raw = [_leaf(torch.randn(total, heads, head_dim, device=device, dtype=dtype)) for _ in range(3)]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    check_cu_seqlens(cu_seqlens, total, max_len)  # once here, so the timed calls skip the host sync
    valid = torch.arange(max_len, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]

    def padded(attend):
        def fn(q, k, v):  # [T, H, D] -> [B, max_len, H, D] -> heads view -> back to [T, H, D]
            pad = lambda x: x.new_zeros(batch, max_len, heads, head_dim).index_put((valid,), x).transpose(1, 2)
            return attend(pad(q), pad(k), pad(v)).transpose(1, 2)[valid]

        return fn

    table = {
        "triton": lambda q, k, v: varlen_attention(q, k, v, cu_seqlens, max_len, check_offsets=False),
        "triton_padded": padded(lambda q, k, v: attention(q, k, v, valid)),
        "eager": lambda q, k, v: varlen_attention_reference(q, k, v, cu_seqlens, max_len),
        "eager_padded": padded(lambda q, k, v: attention_reference(q, k, v, valid)),
        "sdpa_padded": padded(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None])),
    }
    table = {k: v for k, v in table.items() if k in providers}
    reference = lambda q, k, v: varlen_attention_reference(q.float(), k.float(), v.float(), cu_seqlens, max_len)
    flops = 4 * heads * head_dim * sum(n * n for n in lengths)  # real tokens only: padding is not credited
    size = torch.finfo(dtype).bits // 8
    bytes_fwd = size * heads * head_dim * 4 * total  # read q, k, v; write out
    return raw, table, reference, bytes_fwd, 2 * bytes_fwd, (flops, 3.5 * flops)


def setup_bias_gelu(device, dtype, rows, cols, providers):
    from semvlp_kernels.bias_gelu import bias_gelu, bias_gelu_reference

    x = _leaf(torch.randn(rows, cols, device=device, dtype=dtype))
    bias = _leaf(0.1 * torch.randn(cols, device=device, dtype=dtype))
    table = {"triton": bias_gelu, "eager": bias_gelu_reference}
    size = torch.finfo(dtype).bits // 8
    numel = rows * cols
    # fwd: read x, write y; bwd: read dy and x, write dx (bias vectors are negligible).
    reference = lambda x, b: bias_gelu_reference(x.float(), b.float())
    return (
        [x, bias],
        {k: v for k, v in table.items() if k in providers},
        reference,
        2 * numel * size,
        3 * numel * size,
        None,
    )


def setup_residual_layer_norm(device, dtype, rows, cols, dropout_p, providers):
    from semvlp_kernels.residual_layer_norm import residual_layer_norm, residual_layer_norm_reference

    x = _leaf(torch.randn(rows, cols, device=device, dtype=dtype))
    residual = _leaf(torch.randn(rows, cols, device=device, dtype=dtype))
    vecs = [_leaf(s * torch.randn(cols, device=device, dtype=dtype) + m) for s, m in ((0.1, 0), (0.1, 1), (0.1, 0))]
    bias, weight, ln_bias = vecs
    table = {
        "triton": lambda x, b, r, w, lb: residual_layer_norm(x, b, r, w, lb, 1e-12, dropout_p),
        "eager": lambda x, b, r, w, lb: residual_layer_norm_reference(x, b, r, w, lb, 1e-12, dropout_p),
    }
    reference = lambda x, b, r, w, lb: residual_layer_norm_reference(*(t.float() for t in (x, b, r, w, lb)), 1e-12)
    if dropout_p > 0.0:  # random outputs: nothing to check them against
        reference = None
    size = torch.finfo(dtype).bits // 8
    numel = rows * cols
    # fwd: read x, residual, write y; bwd: read dy, x, residual, write d residual (+ dx if dropout).
    bytes_bwd = (4 + (dropout_p > 0)) * numel * size
    inputs = [x, bias, residual, weight, ln_bias]
    return inputs, {k: v for k, v in table.items() if k in providers}, reference, 3 * numel * size, bytes_bwd, None


# The model's fusion sites as semvlp_kernels.dispatch runs them, GEMM included: its eager path
# leaves the bias to cuBLAS's epilogue, so the op-level "eager" above (a bias pass of its own) is a
# baseline the model never runs. These compare what a training step pays for each choice.
def setup_linear_gelu(device, dtype, rows, n_in, n_out, providers):
    """gelu(x W^T + b), the FFN up-projection: x [rows, n_in], W [n_out, n_in]."""
    from semvlp_kernels.dispatch import linear_gelu_eager, linear_gelu_triton

    x = _leaf(torch.randn(rows, n_in, device=device, dtype=dtype))
    w = _leaf(torch.randn(n_out, n_in, device=device, dtype=dtype) / math.sqrt(n_in))
    b = _leaf(0.1 * torch.randn(n_out, device=device, dtype=dtype))
    table = {"triton": linear_gelu_triton, "eager": linear_gelu_eager}
    reference = lambda x, w, b: linear_gelu_eager(x.float(), w.float(), b.float())
    flops = 2 * rows * n_in * n_out  # the GEMM; x3 with the backward's two GEMMs
    return [x, w, b], {k: v for k, v in table.items() if k in providers}, reference, None, None, (flops, 3 * flops)


def setup_linear_residual_layer_norm(device, dtype, rows, n_in, n_out, dropout_p, providers):
    """LayerNorm(residual + dropout(x W^T + b)), a sub-layer's output projection + Add & Norm:
    x [rows, n_in], W [n_out, n_in], residual [rows, n_out]."""
    from semvlp_kernels.dispatch import linear_residual_layer_norm_eager, linear_residual_layer_norm_triton

    x = _leaf(torch.randn(rows, n_in, device=device, dtype=dtype))
    w = _leaf(torch.randn(n_out, n_in, device=device, dtype=dtype) / math.sqrt(n_in))
    residual = _leaf(torch.randn(rows, n_out, device=device, dtype=dtype))
    vecs = [_leaf(s * torch.randn(n_out, device=device, dtype=dtype) + m) for s, m in ((0.1, 0), (0.1, 1), (0.1, 0))]
    table = {
        "triton": lambda *t: linear_residual_layer_norm_triton(*t, 1e-12, dropout_p),
        "eager": lambda *t: linear_residual_layer_norm_eager(*t, 1e-12, dropout_p),
    }
    reference = lambda *t: linear_residual_layer_norm_eager(*(u.float() for u in t), 1e-12)
    if dropout_p > 0.0:  # random outputs: nothing to check them against
        reference = None
    flops = 2 * rows * n_in * n_out
    inputs = [x, w, vecs[0], residual, vecs[1], vecs[2]]  # x, W, b, residual, LN weight, LN bias
    return inputs, {k: v for k, v in table.items() if k in providers}, reference, None, None, (flops, 3 * flops)


def setup_linear_cross_entropy(device, dtype, rows, hidden, vocab, providers):
    from semvlp_kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

    h = _leaf(torch.randn(rows, hidden, device=device, dtype=dtype))
    w = _leaf(torch.randn(vocab, hidden, device=device, dtype=dtype) / math.sqrt(hidden))
    b = _leaf(0.1 * torch.randn(vocab, device=device, dtype=dtype))
    labels = torch.randint(0, vocab, (rows,), device=device)
    table = {
        "triton": lambda h, w, b: linear_cross_entropy(h, w, b, labels),
        "eager": lambda h, w, b: linear_cross_entropy_reference(h, w, b, labels),
    }
    reference = lambda h, w, b: linear_cross_entropy_reference(h.float(), w.float(), b.float(), labels)
    return (
        [h, w, b],
        {k: v for k, v in table.items() if k in providers},
        reference,
        None,
        None,
        (2 * rows * hidden * vocab, 6 * rows * hidden * vocab),
    )


BASE_SHAPES = {"heads": 12, "head_dim": 64, "hidden": 768, "ffn": 3072, "vocab": 30522}  # DESIGN.md 1
TINY_SHAPES = {"heads": 2, "head_dim": 32, "hidden": 64, "ffn": 256, "vocab": 1000}
GPU_PROVIDERS = {
    "attention": ["triton", "eager", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math"],
    "varlen_attention": ["triton", "triton_padded", "eager", "eager_padded", "sdpa_padded"],
    "fused": ["triton", "eager"],
}
CPU_PROVIDERS = {"attention": ["eager"], "varlen_attention": ["eager", "eager_padded"], "fused": ["eager"]}


def model_cases(device, dtype, batch: int, shapes: dict, providers: dict[str, list[str]], quick: bool = False):
    """The model's fused-op cases as (op, case, setup) triples; `setup()` builds that case's inputs
    and providers (see "per-op setups"). `shapes`: heads, head_dim, hidden, ffn, vocab;
    `providers`: the names to build for "attention", "varlen_attention" and "fused" (the others)."""
    heads, head_dim, hidden, ffn, vocab = (shapes[k] for k in ("heads", "head_dim", "hidden", "ffn", "vocab"))
    attention_providers, varlen_providers, fused_providers = (
        providers[k] for k in ("attention", "varlen_attention", "fused")
    )
    text_lengths = [20, 14, 9, 17]  # mixed caption lengths, repeated over the batch
    single_lengths = [101 + n for n in text_lengths]
    attention_cases = [  # (case, Tq, Tk, key lengths or None, attention dropout)
        ("single_121_masked", 121, 121, single_lengths, 0.0),
        ("single_121_nomask", 121, 121, None, 0.0),
        ("image_101", 101, 101, None, 0.0),
        ("text_20_masked", 20, 20, text_lengths, 0.0),
        ("cross_101x20_masked", 101, 20, text_lengths, 0.0),
        ("single_121_masked_drop0.1", 121, 121, single_lengths, 0.1),  # as pre-training runs it
    ]
    if quick:
        attention_cases = [attention_cases[0], attention_cases[1], attention_cases[4]]
    # The memory-bound ops first: nothing to autotune, so a run cut short by a time limit
    # (gpu_check.sh) still has them; each attention shape tunes up to 6 forward and 12 backward
    # configs, compiling each once per specialisation.
    rows = batch * 121  # single-stream tokens
    cases = [("bias_gelu", f"{rows}x{ffn}", lambda: setup_bias_gelu(device, dtype, rows, ffn, fused_providers))]
    cases += [
        ("residual_layer_norm", f"{rows}x{hidden}_drop{p}",
         lambda p=p: setup_residual_layer_norm(device, dtype, rows, hidden, p, fused_providers))
        for p in ([0.1] if quick else [0.0, 0.1])
    ]  # fmt: skip
    # The same two ops as the model dispatches them, GEMM included (after the op-level cases, whose
    # kernels they reuse at the same shapes, so tuned by then): the FFN up- and down-projections
    # and, without --quick, the attention output projection.
    cases.append(("linear_gelu", f"{rows}x{hidden}->{ffn}",
                  lambda: setup_linear_gelu(device, dtype, rows, hidden, ffn, fused_providers)))  # fmt: skip
    projections = [(ffn, 0.1)] if quick else [(ffn, 0.0), (ffn, 0.1), (hidden, 0.1)]
    cases += [
        ("linear_residual_layer_norm", f"{rows}x{n_in}->{hidden}_drop{p}",
         lambda n_in=n_in, p=p: setup_linear_residual_layer_norm(device, dtype, rows, n_in, hidden, p, fused_providers))
        for n_in, p in projections
    ]  # fmt: skip
    cases += [
        ("linear_cross_entropy", f"{n}x{hidden}->{vocab}",
         lambda n=n: setup_linear_cross_entropy(device, dtype, n, hidden, vocab, fused_providers))
        for n in [max(1, round(batch * 20 * 0.15))] + ([] if quick else [batch * 20])
    ]  # fmt: skip
    cases += [
        ("attention", case, lambda tq=tq, tk=tk, lengths=lengths, p=p: setup_attention(
            device, dtype, batch, heads, head_dim, tq, tk, lengths, attention_providers, p))
        for case, tq, tk, lengths, p in attention_cases
    ]  # fmt: skip
    # Captions of 8..20 tokens (every length from batch 13 on, mean 14) packed without padding vs
    # padded to the longest; single-stream (--packed_text): 101 image tokens + those captions.
    caption_lengths = [8 + (5 * i) % 13 for i in range(batch)]
    varlen_cases = [("text_8..20_packed", caption_lengths)]
    if not quick:
        varlen_cases.append(("single_109..121_packed", [101 + n for n in caption_lengths]))
    cases += [
        ("varlen_attention", case, lambda lengths=lengths: setup_varlen_attention(
            device, dtype, batch, heads, head_dim, lengths, varlen_providers))
        for case, lengths in varlen_cases
    ]  # fmt: skip
    return cases


# ---------------------------------------------------------------- what Triton chose


def _triton_kernels():
    """(name, kernel) for our autotuned kernels' Autotuner objects and our plain JIT kernels."""
    import triton

    from semvlp_kernels import attention, bias_gelu, linear_cross_entropy, residual_layer_norm, varlen_attention

    for module in (attention, varlen_attention, bias_gelu, residual_layer_norm, linear_cross_entropy):
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and isinstance(obj, (triton.runtime.Autotuner, triton.runtime.JITFunction)):
                yield name, obj


def _config_text(config) -> str:
    return " ".join([*(f"{k}={v}" for k, v in config.kwargs.items()), f"num_warps={config.num_warps}"])


def autotune_choices(reported: set) -> list[dict]:
    """The autotuner's decisions for our kernels not in `reported` yet (which this updates): per
    (kernel, tuning key) the chosen config and, for the key it tuned last, every config's
    [p50, p20, p80] ms. Autotuning only happens with more than one config (not under pytest)."""
    import triton

    rows = []
    for name, tuner in _triton_kernels():
        if not isinstance(tuner, triton.runtime.Autotuner) or not tuner.cache:
            continue
        last_tuned = list(tuner.cache)[-1]
        for key, config in tuner.cache.items():
            if (name, key) in reported:
                continue
            reported.add((name, key))
            values = dict(zip(tuner.keys, key, strict=False))  # the key ends with the tensors' dtypes
            values["dtypes"] = [str(k) for k in key[len(tuner.keys) :]]
            row = {"kernel": name, "key": values, "chosen": _config_text(config)}
            timings = getattr(tuner, "configs_timings", None)
            if key == last_tuned and timings:
                row["timings_ms"] = {_config_text(c): t for c, t in timings.items()}
            rows.append(row)
    return rows


def compiled_kernels() -> list[dict]:
    """Every compiled variant of our kernels as loaded on the device: registers and spill bytes
    per thread, shared memory, and its block sizes (benchmarks/kernel_resources.py gives the same
    without a GPU, for any target)."""
    import triton

    rows = []
    for name, kernel in _triton_kernels():
        jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel  # it wraps its JITFunction
        for kernel_cache, *_ in jit.device_caches.values():
            for compiled in kernel_cache.values():
                names = compiled.src.fn.arg_names
                constants = {names[path[0]]: v for path, v in compiled.src.constants.items() if len(path) == 1}
                rows.append({
                    "kernel": name,
                    "constexprs": {k: v for k, v in constants.items() if isinstance(v, (bool, int, str))},
                    "num_warps": compiled.metadata.num_warps,
                    "registers": getattr(compiled, "n_regs", None),
                    "spill_bytes": getattr(compiled, "n_spills", None),
                    "shared_bytes": compiled.metadata.shared,
                })  # fmt: skip
    return rows


# ---------------------------------------------------------------- measuring one case


def host_time(fn, device: torch.device, calls: int = 20) -> float:
    """Host milliseconds per call (Python, autograd, launches), calls back to back without waiting
    for the device. Above the device p50 the op is launch-bound at this size: in a model step it
    then costs its host time unless enough earlier work is queued on the device to hide it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
    return elapsed / calls * 1e3


def profile_table(fn, device: torch.device, calls: int = 10) -> str:
    """torch.profiler over `calls` back-to-back calls: where the host time goes (Python, autograd,
    launches, allocations) next to the device kernels, by total CPU time."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm caches outside the trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=20)


def peak_memory_mb(closure, inputs: list[torch.Tensor], device: torch.device) -> float | None:
    """MiB at the peak of one call of `closure`, its inputs included (None off CUDA): the most it
    allocated above what was live before it, plus the storage of `inputs`, so that leftovers (the
    check's reference output, earlier cases' caches) do not count. An untimed call of its own, the
    inputs' grads cleared first as do_bench does: the timer allocates too (do_bench's 256 MiB
    L2-flush buffer), after any reset around it."""
    if device.type != "cuda":
        return None
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    closure()  # its output is freed on return, after the peak it was part of
    torch.cuda.synchronize(device)
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in inputs}
    return (torch.cuda.max_memory_allocated(device) - before + sum(held.values())) / 2**20


def _fresh_grads(inputs: list[torch.Tensor], closure) -> None:
    for t in inputs:  # as do_bench's grad_to_none: no accumulation kernels from earlier calls
        t.grad = None
    closure()


def measure_case(op, case, setup, timer, device, modes, results, with_check=True, profiles=None):
    """Time every provider of one case; with `profiles` (a list), also profile the first provider
    (triton on a GPU) forward + backward and append (title, table) to it."""
    try:
        inputs, providers, reference, bytes_fwd, bytes_bwd, flops_fwd = setup()
    except Exception as exc:  # noqa: BLE001 - record and keep going
        results.append({"op": op, "case": case, "provider": "*", "error": f"setup: {exc!r}"})
        return
    expected = None
    if with_check and reference is not None:
        try:
            expected = reference(*inputs).detach()
        except Exception as exc:  # noqa: BLE001
            results.append({"op": op, "case": case, "provider": "reference", "error": repr(exc)})
    for provider, fn in providers.items():
        row_base = {"op": op, "case": case, "provider": provider}
        try:
            out = fn(*inputs)
            grad = torch.randn_like(out)
            check = None
            if expected is not None:
                check = (out.float() - expected.float()).abs().max().item()
            del out  # and the activations its graph holds, which the timed calls do not need
        except Exception as exc:  # noqa: BLE001
            results.append({**row_base, "mode": "check", "error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        for mode in modes:
            row = {**row_base, "mode": mode, "max_abs_diff_vs_fp32_reference": check}
            try:
                if mode == "forward":
                    closure = lambda fn=fn: fn(*inputs)
                else:

                    def closure(fn=fn, grad=grad):
                        torch.autograd.backward(fn(*inputs), grad)

                p50, p20, p80 = timer(closure, grad_to_none=inputs)
                # grads cleared before each call, as do_bench and a training step do: no accumulation launches
                host_ms = host_time(lambda closure=closure: _fresh_grads(inputs, closure), device)
                row.update(p50_ms=p50, p20_ms=p20, p80_ms=p80, host_ms=host_ms)
                if device.type == "cuda":
                    read = inputs if mode == "forward" else [*inputs, grad]  # the backward reads grad
                    row["peak_mb"] = peak_memory_mb(closure, read, device)
                    try:  # a diagnostic: its failure must not turn the timed row into an error
                        row["device_ms"] = device_ms(lambda closure=closure: _fresh_grads(inputs, closure), device)
                    except Exception as exc:  # noqa: BLE001
                        row["device_ms_error"] = f"{type(exc).__name__}: {exc}"[:300]
                bytes_moved = bytes_fwd if mode == "forward" else (bytes_fwd + bytes_bwd if bytes_fwd else None)
                if bytes_moved:
                    row["GBps"] = bytes_moved / p50 / 1e6
                    if row.get("device_ms"):
                        row["device_GBps"] = bytes_moved / row["device_ms"] / 1e6
                if flops_fwd:
                    flops = flops_fwd[0] if mode == "forward" else flops_fwd[1]
                    row["TFLOPs"] = flops / p50 / 1e9
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            if profiles is not None and mode == "full" and provider == next(iter(providers)) and "error" not in row:
                try:
                    profiles.append((f"{op} {case} {provider} forward+backward", profile_table(closure, device)))
                except Exception as exc:  # noqa: BLE001
                    profiles.append((f"{op} {case} {provider}", f"profiling failed: {exc!r}"))
            for t in inputs:
                t.grad = None
            results.append(row)
            print(_format_row(row), flush=True)


def _format_row(row: dict) -> str:
    if "error" in row:
        where = f"{row['op']:>26} {row['case']:<25} {row['provider']:<15} {row.get('mode', ''):<8}"
        return f"{where} ERROR {row['error'][:80]}"
    extra = ""
    if "GBps" in row:
        extra += f" {row['GBps']:8.1f} GB/s"
    if "TFLOPs" in row:
        extra += f" {row['TFLOPs']:7.1f} TFLOP/s"
    times = f"{row['p50_ms']:8.3f} ms (host {row['host_ms']:7.3f}"
    times += f", device {row['device_ms']:7.3f})" if row.get("device_ms") else ")"
    return f"{row['op']:>26} {row['case']:<25} {row['provider']:<15} {row['mode']:<8} {times}{extra}"


def speedups(results: list[dict], copy_GBps: float | None = None) -> list[dict]:
    """triton vs eager and vs the fastest non-triton provider, per (op, case, mode), once by wall-clock
    p50 and (CUDA) once by device time: `timing` names which. `pct_of_copy`: triton's bytes moved per
    second as a percentage of the device-to-device copy bandwidth (issue #6's target for the
    memory-bound ops: at least 70), where both are known."""
    out = []
    for key, rate in (("p50_ms", "GBps"), ("device_ms", "device_GBps")):
        groups: dict[tuple, dict[str, dict]] = {}
        for r in results:
            if r.get(key):
                groups.setdefault((r["op"], r["case"], r["mode"]), {})[r["provider"]] = r
        for (op, case, mode), rows in groups.items():
            if "triton" not in rows:
                continue
            times = {p: r[key] for p, r in rows.items()}
            others = {p: t for p, t in times.items() if p != "triton"}
            best = min(others, key=others.get) if others else None
            row = {"op": op, "case": case, "mode": mode, "timing": key, "triton_ms": times["triton"]}
            row["speedup_vs_eager"] = times["eager"] / times["triton"] if "eager" in times else None
            row.update(best_other=best, speedup_vs_best_other=others[best] / times["triton"] if best else None)
            moved = rows["triton"].get(rate)
            row["pct_of_copy"] = 100 * moved / copy_GBps if moved and copy_GBps else None
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="fewer cases, shorter timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="default 64 on CUDA, 2 on CPU")
    parser.add_argument(
        "--profile", action="store_true", help="also profile each case's first provider forward+backward (a .txt)"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if on_gpu else "fp32")
    ]
    batch = args.batch or (64 if on_gpu else 2)
    # CPU: tiny shapes and reference providers only (no interpreter), so the script cannot rot.
    shapes = BASE_SHAPES if on_gpu else TINY_SHAPES
    providers = GPU_PROVIDERS if on_gpu else CPU_PROVIDERS
    modes = ["forward", "full"]
    timer = Timer(device, args.quick)
    torch.manual_seed(0)

    meta = {
        "device": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or "cpu",
        "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(device)) if on_gpu else None,
        **_versions(),
        "git_commit": _git_commit(),
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch,
        "quick": args.quick,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shapes": shapes,
    }
    print(json.dumps(meta), flush=True)
    results: list[dict] = []
    profiles: list[tuple[str, str]] | None = [] if args.profile else None
    bandwidth = None
    try:
        bandwidth = copy_bandwidth(device, timer)
        print(f"device-to-device copy: {bandwidth} GB/s", flush=True)
    except Exception as exc:  # noqa: BLE001
        results.append({"op": "copy", "case": "-", "provider": "torch", "error": repr(exc)})

    cases = model_cases(device, dtype, batch, shapes, providers, args.quick)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = (meta["device"] or "cpu").replace(" ", "_").replace("/", "_")
    path = out_dir / f"kernels_{tag}_{meta['dtype']}_{datetime.datetime.now():%Y%m%d_%H%M%S}.json"
    profile_path = path.with_name(path.stem + "_profile.txt")
    report: dict = {}

    autotuned: list[dict] = []
    reported: set = set()

    def save() -> None:
        report.update(meta=meta, copy_GBps=bandwidth, results=results, speedups=speedups(results, bandwidth))
        if on_gpu:
            try:  # reads Triton's caches: a Triton that changes them must not cost the timings
                autotuned.extend(autotune_choices(reported))
                report.update(autotune=autotuned, compiled=compiled_kernels())
            except Exception as exc:  # noqa: BLE001
                report["autotune_error"] = f"{type(exc).__name__}: {exc}"
        path.write_text(json.dumps(report, indent=1))
        if profiles:
            profile_path.write_text("".join(f"== {title}\n{table}\n\n" for title, table in profiles))

    for op, case, setup in cases:
        measure_case(op, case, setup, timer, device, modes, results, profiles=profiles)
        save()  # after every case: a run cut short (gpu_check's stage limits) keeps what it measured
    if profiles:
        print(f"wrote {profile_path}")
    print("\nspeedups (triton vs others, by wall-clock p50_ms and by device_ms):", flush=True)
    for s in report["speedups"]:
        eager = f"{s['speedup_vs_eager']:.2f}x eager" if s["speedup_vs_eager"] else ""
        best = f"{s['speedup_vs_best_other']:.2f}x {s['best_other']}" if s["best_other"] else ""
        copy = f"{s['pct_of_copy']:.0f}% of copy" if s["pct_of_copy"] else ""
        where = f"{s['op']:>26} {s['case']:<25} {s['mode']:<8} {s['timing']:<9}"
        print(f"  {where} {s['triton_ms']:.3f} ms  {eager}  {best}  {copy}")
    errors = [r for r in results if "error" in r]
    print(f"wrote {path} ({len(results)} rows, {len(errors)} errors)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001 - never lose the traceback in a batch job
        traceback.print_exc()
        sys.exit(1)
