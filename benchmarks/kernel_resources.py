"""Compile every Triton kernel for a GPU this machine need not have, and report what ptxas gave it.

    python benchmarks/kernel_resources.py                         # sm_90 (H100, H200), bf16
    python benchmarks/kernel_resources.py --arch 80 --dtype fp16  # A100, fp16
    python benchmarks/kernel_resources.py --arch 70 --dtype fp16  # V100: the ops dispatch runs in Triton there
    python benchmarks/kernel_resources.py --out DIR               # JSON goes to DIR (default benchmarks/results)

The tests run the kernels in Triton's interpreter, which never meets the GPU compiler: a kernel can
pass them and still fail to compile, and a kernel's half-precision paths (bf16 `tl.dot` is wrong
in the interpreter, DESIGN.md 6) are never built. This script builds them with the same Triton and
ptxas as on a GPU machine, without one: it swaps Triton's CUDA driver for one that targets the
chosen architecture and launches nothing, then runs forward and backward of every fused op of
benchmarks/fused_ops.py at the model's shapes (base preset, batch 64) on CPU tensors. Every
kernel is compiled with the arguments the model passes (so with the same specialisations) and,
for autotuned kernels, at every config the autotuner would time.

Per compiled kernel it records registers per thread, spill bytes (the stack frame ptxas had to
give it: local memory, what `n_spills` reads on a GPU), shared memory, and the theoretical
occupancy these allow (warps per SM, by the CUDA occupancy rules below), in one JSON file
(meta: target, dtype, torch/triton/ptxas versions, git commit) and a table printed last.
What it cannot tell: time. Spills and occupancy explain a slow kernel; only a GPU measures one
(benchmarks/fused_ops.py).

Exit status: 0 when every kernel compiled, 1 when one failed (its error is in the JSON and printed),
2 on bad options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_ops import BASE_SHAPES, _git_commit, _versions, model_cases, setup_linear_cross_entropy  # noqa: E402

# Per-SM limits of the targets (CUDA C Programming Guide, "Compute Capabilities" table).
REGISTERS_PER_SM_PARTITION = 16384  # 4 partitions (one per warp scheduler) of 64K registers
REGISTER_ALLOCATION_UNIT = 256  # registers are given to warps in units of 256
MAX_WARPS_PER_SM = 64  # the same on sm_70, sm_80 and sm_90
MAX_BLOCKS_PER_SM = 32
SHARED_MEMORY_PER_SM = {70: 96 * 1024, 80: 164 * 1024, 90: 228 * 1024}
SHARED_MEMORY_PER_BLOCK = {70: 96 * 1024, 80: 163 * 1024, 90: 227 * 1024}
SHARED_MEMORY_RESERVED_PER_BLOCK = {70: 0, 80: 1024, 90: 1024}  # taken by the runtime on sm_80+
MULTIPROCESSORS = {70: 80, 80: 108, 90: 132}  # V100, A100, H100 SXM: what sizes the grids that depend on it
# The ops kernels/dispatch.py runs in Triton on sm_7x (TRITON_SM7X: attention is SDPA's there).
SM7X_OPS = ["bias_gelu", "residual_layer_norm", "linear_cross_entropy"]


@dataclass
class KernelResources:
    kernel: str
    op: str  # the fused op, and the case that first compiled this specialisation
    case: str
    config: dict  # num_warps, num_stages and the kernel's tile-size constexprs
    registers: int  # per thread
    spill_bytes: int  # per thread: ptxas's stack frame, in local memory
    shared_bytes: int  # per block
    warps_per_sm: int  # theoretical occupancy: resident warps per SM (at most 64)
    limited_by: str  # registers | shared memory | warps | blocks


def occupancy(arch: int, num_warps: int, registers: int, shared_bytes: int) -> tuple[int, str]:
    """Resident warps per SM for blocks of `num_warps` warps, and the resource that limits them."""
    registers_per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    warps_by_registers = 4 * (REGISTERS_PER_SM_PARTITION // registers_per_warp)
    shared = shared_bytes + SHARED_MEMORY_RESERVED_PER_BLOCK[arch]
    limits = {  # blocks per SM under each limit; on a tie the hardware caps are named first
        "warps": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
        "registers": warps_by_registers // num_warps,
        "shared memory": SHARED_MEMORY_PER_SM[arch] // shared if shared_bytes else MAX_BLOCKS_PER_SM,
    }
    limit = min(limits, key=limits.get)
    return limits[limit] * num_warps, limit


class OfflineDriver:
    """Stands in for Triton's CUDA driver: targets `arch`, loads nothing, launches nothing.

    Triton's JIT asks its active driver for the target (so it compiles for `arch`), for the
    current device and stream, for the device's shared memory (to refuse kernels that need more),
    to load each compiled binary (which returns its registers and spills: read here from the
    cubin with cuobjdump, the tool next to Triton's ptxas), and for a launcher (here a no-op).
    The autotuner asks for a benchmarker: here one call per config, so every config is compiled.
    """

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = self  # Triton calls driver.utils.load_binary / get_device_properties
        self.op, self.case = "", ""  # what is running, for the records
        self.records: list[KernelResources] = []
        self._pending: dict = {}

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        def compile_once(fn, quantiles=None, **_):
            fn()
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return compile_once

    def get_device_properties(self, device: int) -> dict:
        return {"max_shared_mem": SHARED_MEMORY_PER_BLOCK[self.arch]}

    def launcher_cls(self, src, metadata):
        # Called just before load_binary for the same kernel: keep what the record needs.
        names = src.fn.arg_names
        tiles = ("BLOCK", "ROWS")  # the tile-size constexprs
        blocks = {names[path[0]]: v for path, v in src.constants.items() if any(t in names[path[0]] for t in tiles)}
        self._pending = {"num_warps": metadata.num_warps, "num_stages": metadata.num_stages, **blocks}
        return lambda *args, **kwargs: None

    def load_binary(self, name: str, cubin: bytes, shared: int, device: int):
        registers, spill_bytes = cubin_registers_and_stack(cubin)
        config = self._pending
        warps, limit = occupancy(self.arch, config["num_warps"], registers, shared)
        self.records.append(
            KernelResources(name, self.op, self.case, config, registers, spill_bytes, shared, warps, limit)
        )
        return 0, 0, registers, spill_bytes, 1024  # module, function, n_regs, n_spills, max threads


def nvidia_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def cubin_registers_and_stack(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = subprocess.run(
            [nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", dump)
    if not found:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{dump}")
    return int(found[1]), int(found[2])


def ptxas_version(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    done = subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, text=True)
    release = [line for line in done.stdout.splitlines() if "release" in line]  # "..., release 13.4, V13.4.59"
    return release[0].split("release")[-1].strip(" ,") if done.returncode == 0 and release else "unknown"


def compile_all(arch: int, dtype: torch.dtype, batch: int, ops: list[str] | None) -> tuple[list, list]:
    """Compile every Triton kernel of the model's fused ops for `arch`. Returns (records, errors)."""
    from triton.runtime import driver

    offline = OfflineDriver(arch)
    providers = {"attention": ["triton"], "varlen_attention": ["triton"], "fused": ["triton"]}
    errors = []
    from semvlp_kernels import residual_layer_norm

    # Its backward's grid follows the SM count, and so does an argument the kernel specialises on.
    residual_layer_norm.multiprocessor_count = lambda device: MULTIPROCESSORS[arch]
    cases = model_cases(torch.device("cpu"), dtype, batch, BASE_SHAPES, providers)
    # Rows only size the masked-LM kernel's grid: one row builds the kernel that the model's cases
    # would, without their GEMMs on this CPU (fp16: ~12 s).
    hidden, vocab = BASE_SHAPES["hidden"], BASE_SHAPES["vocab"]
    one_row = partial(setup_linear_cross_entropy, torch.device("cpu"), dtype, 1, hidden, vocab, providers["fused"])
    cases = [c for c in cases if c[0] != "linear_cross_entropy"] + [
        ("linear_cross_entropy", f"1x{hidden}->{vocab}", one_row)
    ]
    driver.set_active(offline)  # for the rest of the process: without a GPU there is no driver to go back to
    for op, case, setup in cases:
        if ops and op not in ops:
            continue
        offline.op, offline.case = op, case
        try:
            inputs, table, *_ = setup()
            out = table["triton"](*inputs)
            out.backward(torch.randn_like(out))
        except Exception as exc:  # noqa: BLE001 - record and keep going: one report names every failure
            errors.append({"op": op, "case": case, "error": f"{type(exc).__name__}: {exc}"[:4000]})
            traceback.print_exc()
    return offline.records, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_MEMORY_PER_SM), help="compute capability")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ops", nargs="*", help="only these fused ops (default: all; on sm_7x those dispatch runs)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        parser.error("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it")
    if args.dtype == "bf16" and args.arch < 80:
        parser.error(f"--dtype bf16 needs sm_80 or newer; sm_{args.arch} runs fp16 (DESIGN.md 5)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    torch.manual_seed(0)
    ops = args.ops or (SM7X_OPS if args.arch < 80 else None)
    records, errors = compile_all(args.arch, dtype, args.batch, ops)
    meta = {
        "target": f"sm_{args.arch}",
        "compiled_offline": True,  # on this machine, no GPU involved
        "compiled_on": platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "batch": args.batch,
        "shapes": BASE_SHAPES,
        "ops": ops or "all",
        **_versions(),
        "ptxas": ptxas_version(args.arch),
        "git_commit": _git_commit(),
        "autotune": os.environ.get("SEMVLP_TRITON_AUTOTUNE", "1") != "0",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"resources_sm{args.arch}_{args.dtype}_{datetime.datetime.now():%Y%m%d_%H%M%S}.json"
    path.write_text(json.dumps({"meta": meta, "kernels": [asdict(r) for r in records], "errors": errors}, indent=1))

    print(f"\n{meta['target']} {args.dtype}, triton {meta['triton']}, ptxas {meta['ptxas']}")
    print(f"{'kernel':<36} {'first case':<20} {'config':<40} {'regs':>4} {'spill':>5} {'smem':>6} warps/SM")
    for r in records:
        config = " ".join(f"{k}={v}" for k, v in r.config.items()).replace("num_", "")
        spill = r.spill_bytes or "-"
        print(
            f"{r.kernel.lstrip('_'):<36} {r.case:<20} {config:<40} {r.registers:>4} {spill:>5} {r.shared_bytes:>6} "
            f"{r.warps_per_sm:>3} ({r.limited_by})"
        )
    for e in errors:
        print(f"FAILED {e['op']} {e['case']}: {e['error'].splitlines()[0]}")
    print(f"wrote {path} ({len(records)} kernels, {len(errors)} failures)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
