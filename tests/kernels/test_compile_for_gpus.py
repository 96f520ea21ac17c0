"""Every Triton kernel compiles for the GPUs we dispatch to, on this CPU machine.

The other kernel tests interpret the kernels; the GPU compiler never sees them there. Here
benchmarks/kernel_resources.py builds them with this machine's Triton and ptxas for sm_90 (H100),
sm_80 (A100) and sm_70 (V100: the ops kernels/dispatch.py runs in Triton there), at the model's
shapes and at every autotune config, and reports registers and spills per kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FORWARD_AND_BACKWARD = {
    "attention": ["_attention_forward_kernel", "_attention_backward_kernel"],
    "varlen_attention": ["_varlen_attention_forward_kernel", "_varlen_attention_backward_kernel"],
    "bias_gelu": ["_bias_gelu_forward_kernel", "_bias_gelu_backward_kernel"],
    "residual_layer_norm": ["_residual_layer_norm_forward_kernel", "_residual_layer_norm_backward_kernel"],
    # Its backward is a scaling in torch: the gradients are computed in the forward kernel.
    "linear_cross_entropy": ["_linear_cross_entropy_forward_kernel"],
}
SM7X_OPS = ["bias_gelu", "residual_layer_norm", "linear_cross_entropy"]
# Spill bytes per thread tolerated in a kernel's best config: a value or two (the residual
# LayerNorm backward with dropout stacks 8 bytes on a V100). Before it had 16-row tiles, the
# attention backward's four configs spilled 8, 264, 272 and 616 bytes on an A100.
MAX_SPILL_BYTES = 16


TARGETS = {  # test id: (arch, dtype, the ops compiled for it)
    "sm_90-H100": (90, "bf16", list(FORWARD_AND_BACKWARD)),
    "sm_80-A100": (80, "bf16", list(FORWARD_AND_BACKWARD)),
    "sm_70-V100": (70, "fp16", SM7X_OPS),
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """Compile for every target at once, one process each, so that the machine's cores share the
    work (about 100 s of compiling on one core). Returns {test id: (process, stderr, output folder)}."""
    unset = ("TRITON_INTERPRET", "SEMVLP_TRITON_AUTOTUNE", "TRITON_DEFAULT_FP_FUSION")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    running = {}
    for name, (arch, dtype, _) in TARGETS.items():
        out = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, str(REPO / "benchmarks" / "kernel_resources.py"), "--arch", str(arch), "--dtype", dtype]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        running[name] = subprocess.Popen([*cmd, "--out", str(out)], env=env, **pipes), out
    done = {}
    for name, (process, out) in running.items():
        stdout, stderr = process.communicate(timeout=900)
        done[name] = process.returncode, stdout, stderr, out
    return done


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_kernel_compiles_with_a_config_that_does_not_spill(target, reports):
    arch, dtype, ops = TARGETS[target]
    returncode, stdout, stderr, out = reports[target]
    assert returncode == 0, stdout[-4000:] + stderr[-4000:]
    # Every launch states enable_fp_fusion, so Triton >= 3.9 has no default to warn about (3.10 flips it).
    assert "TRITON_DEFAULT_FP_FUSION" not in stderr
    (path,) = out.glob(f"resources_sm{arch}_{dtype}_*.json")
    report = json.loads(path.read_text())
    assert report["meta"]["target"] == f"sm_{arch}" and report["errors"] == []
    kernels = report["kernels"]
    assert sorted({k["kernel"] for k in kernels}) == sorted(name for op in ops for name in FORWARD_AND_BACKWARD[op])
    assert {k["op"] for k in kernels} == set(ops)
    # Autotuning times every config, so a config that spills costs only tuning time, unless all do.
    configs = defaultdict(list)
    for k in kernels:
        assert k["registers"] <= 255 and 0 < k["warps_per_sm"] <= 64, k
        configs[(k["kernel"], k["case"])].append(k)
    for (kernel, case), tried in configs.items():
        spills = [(k["config"], k["spill_bytes"]) for k in tried]
        assert min(s for _, s in spills) <= MAX_SPILL_BYTES, f"sm_{arch} {kernel} ({case}) spills: {spills}"
