"""Training-step throughput of SemVLP pre-training: samples/s, model TFLOP/s, MFU, and peers in the same run.

    python benchmarks/throughput.py                       # GPU: base preset, micro-batch 64, bf16; CPU: tiny, fp32
    python benchmarks/throughput.py --peers --padding-study --find-max-batch --compile both
    python benchmarks/throughput.py --preset tiny --batch-size 4 --modes single,two,alternate --peers

What one step is. A full optimizer step of `SemVLPForPreTraining` on one fixed synthetic batch of the
real shapes (K = 100 objects x 2048-d fp16 features, text up to 20 tokens, 15% masked tokens and
objects, half the pairs mismatched, a quarter with a QA label), already on the device: forward with
all pre-training losses, backward, gradient clipping at the ds_configs' global norm 1.0
(`--grad-clip`), then `torch.optim.AdamW` (fused where torch has it) over every parameter: as
DeepSpeed's ZeRO optimizer steps its flat partitions whole, parameters a mode leaves unused
(cross-attention in single-stream steps) step with zero gradients. The batch is fixed so the input
pipeline is out of the measurement (nanoGPT `bench.py`). The step is plain PyTorch, not the DeepSpeed
engine, so that the number isolates the model and its kernels; the precision handling copies what
DeepSpeed's bf16/fp16 modes do (below), so the optimizer's share of the step is the one the trainer pays.
Modes: "single" and "two" stream, and "alternate" (single, two, single, ... as the paper's 50/50
strategy; its per-step figures are the mean of both).
Text (`--text`): the main runs use "full" by default, every caption 20 real tokens (the most work per
sample); "pad20" / "longest" give them lengths uniform in 8..20 padded to 20 / to the batch's longest.
Every padded layout passes an attention mask, all ones for "full", as the trainer's collate does (so
SDPA runs the kernels training gets, not the flash kernel it picks without a mask). `--padding-study`
times all layouts (text_lengths) on the fastest backend (or `--padding-backend`'s), including
"packed": the same lengths without any padding (PackedText through the model, what
`launch/pretrain.py --packed_text` trains with), and records which attention the packed path ran
(packed_attention); `--padding-backend triton` times it with the Triton varlen kernel. A layout whose
batch equals an earlier one's (at micro-batch 64 "longest" is nearly always padded to 20, as pad20)
is recorded as skipped, naming that layout.

Precision (`--amp cast`, the default): like DeepSpeed's bf16/fp16 modes, the model's parameters are
cast to bf16/fp16 and the optimizer keeps fp32 master weights: after backward the grads are copied
into fp32, fused AdamW steps the masters, and the masters are copied back. fp16 adds dynamic loss
scaling (torch.amp.GradScaler on the master grads). `--amp autocast` instead keeps fp32 parameters
under torch.autocast. fp32 on CUDA uses TF32 matmuls (`set_float32_matmul_precision("high")`).

Timing. `--warmup` steps (compilation and Triton autotuning happen there), then `--repeats` x
`--steps` steps. On CUDA each repeat is timed with CUDA events around its steps (synchronizing only at
the end of a repeat), on CPU with time.perf_counter. ms/step is the median over repeats; the spread
is (max - min) / median of the repeats. Events between backward and the optimizer split the step
into fwd+bwd and optimizer time (medians over all timed steps). On CUDA two more steps of each main
and compiled run go under torch.profiler: device_ms_per_step is the GPU's kernel time per step
(benchmarks/device_time.py) and gpu_busy_pct its share of ms/step; well below 100% the step is
host-bound (launches, Python, syncs), which CUDA graphs address: `--compile-mode reduce-overhead`.
Compiled runs also record the graph breaks met while compiling (graph_breaks, graph_break_reasons):
each splits the compiled step, and CUDA graphs cover only the pieces. The pre-training losses
find their masked rows with nonzero (a data-dependent shape): two breaks per step.

`--gradient-checkpointing` times our model under activation checkpointing (what the launchers'
--gradient_checkpointing turns on): each block runs again in the backward. Its model FLOPs and MFU
stay those of the step without the recompute (the MFU convention: work the model needs, not work
done), so the recompute shows as lower MFU; `--find-max-batch` with it shows the larger batch.

Model FLOPs: `semvlp.flops.training_step_flops` (its docstring has the exact count: 6 x rows x
n_in x n_out per matmul plus 12 x d x s_q x s_k per attention layer, each stream with its own
lengths, real tokens only), the MFU convention of nanoGPT / llm-foundry made exact per matmul.
Peers are measured with torch.utils.flop_counter: executed matmul FLOPs, which for them include
work the model FLOPs convention leaves out (VisualBERT's masked-LM logits at all 120 positions, about
a fifth of its count at base), so their TFLOP/s is executed work and they get no MFU; compare peers
by samples/s (the ratios). tests/test_benchmarks.py checks that our formula matches the counter on our model.
tokens/s counts K + m input tokens per sample for every model. MFU = model TFLOP/s over the
device's dense peak for the precision (semvlp/peaks.py); unknown devices get no MFU.

Output: a JSON file (`--out`, a .json path or a folder) with the device, versions, git commit, date
and every figure, rewritten after each run so a killed job keeps what it measured; a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from semvlp.config import PRESETS, config_from_preset
from semvlp.flops import training_step_flops
from semvlp.peaks import peak_tflops
from semvlp.run_config import COMPILE_MODES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_time import device_ms  # noqa: E402
from peers import PEER_MODE, build_peer, peer_forward, peer_inputs  # noqa: E402
from report import format_tables  # noqa: E402

SCHEMA = "semvlp-throughput/1"
MODES = ("single", "two", "alternate")
BACKENDS = ("eager", "sdpa", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROFILED_SECTIONS = ("main", "compiled")  # runs whose kernel time per step is measured (device_time)
CLS_ID, SEP_ID, MASK_ID = 101, 102, 103  # BERT's WordPiece ids
GRAD_CLIP = 1.0  # every ds_configs/*.json's gradient_clipping (tests/test_benchmarks.py checks)
MASK_PROB = 0.15
# Text layouts of the padding study (see text_lengths).
LAYOUTS = ("full", "pad20", "longest", "bucket-pad20", "bucket-longest", "packed")
# Errors after which the CUDA context is unusable: later runs are skipped, not attempted.
CUDA_FATAL = ("illegal memory access", "unspecified launch failure", "device-side assert", "CUDA error: misaligned")


# ---------------------------------------------------------------- synthetic batch


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # SemVLPForPreTraining's keyword arguments (without `mode`)
    lengths: list[int]  # real text tokens per sample, [CLS] and [SEP] included
    num_mlm: int  # masked text tokens in matched pairs (rows the masked-LM head computes)
    num_obj: int  # masked objects in matched pairs (rows the object heads compute)

    @property
    def size(self) -> int:
        return len(self.lengths)


def text_lengths(kind: str, batch_size: int, max_len: int, seed: int) -> tuple[list[int], int]:
    """(lengths, padded length) for a text layout.

    full: every caption max_len tokens; pad20: lengths uniform in [8, max_len], padded to
    max_len; longest: the same lengths padded to the batch's longest; bucket-pad20 / bucket-longest:
    a length-bucketed batch of short captions (uniform in [8, 12]) padded to max_len / to its longest;
    packed: longest's lengths, built padded to the longest and then packed (pack_text).
    """
    g = torch.Generator().manual_seed(seed + 1)
    low = min(8, max_len)
    if kind == "full":
        return [max_len] * batch_size, max_len
    high = min(12, max_len) if kind.startswith("bucket") else max_len
    lengths = torch.randint(low, high + 1, (batch_size,), generator=g).tolist()
    pad_to = max(lengths) if kind.endswith("longest") or kind == "packed" else max_len
    return lengths, pad_to


def graph_breaks(since: dict[str, int] | None = None) -> dict[str, int]:
    """torch.compile's graph breaks so far, {reason (first line): count}; with `since`, only those after it."""
    from torch._dynamo.utils import counters

    now: dict[str, int] = {}
    for reason, count in counters["graph_break"].items():
        first_line = reason.strip().splitlines()[0]
        now[first_line] = now.get(first_line, 0) + count
    if since is None:
        return now
    return {reason: count - since.get(reason, 0) for reason, count in now.items() if count > since.get(reason, 0)}


def make_batch(cfg, lengths: list[int], pad_to: int, device: torch.device, seed: int = 0) -> Batch:
    """A pre-training batch with the statistics of the real one, on `device`. It has an attention mask
    even when nothing is padded, as every batch the trainer's collate makes (semvlp/data/batching.py):
    with a mask SDPA cannot choose its flash kernel, which it would without."""
    g = torch.Generator().manual_seed(seed)
    batch, num_objects = len(lengths), cfg.num_objects
    length = torch.tensor(lengths)[:, None]
    position = torch.arange(pad_to)[None, :]
    # Drawn at the longest caption's width, then padded: the same lengths padded further hold the same text.
    longest = max(lengths)
    words = torch.randint(min(1000, cfg.vocab_size - 1), cfg.vocab_size, (batch, longest), generator=g)
    words = torch.nn.functional.pad(words, (0, pad_to - longest))
    words = torch.where(position == 0, CLS_ID, torch.where(position == length - 1, SEP_ID, words))
    inner = (position > 0) & (position < length - 1)  # word positions, between [CLS] and [SEP]
    picked = torch.nn.functional.pad(torch.rand(batch, longest, generator=g) < MASK_PROB, (0, pad_to - longest)) & inner
    picked[:, 1] |= ~picked.any(dim=1) & (length[:, 0] > 2)  # at least one masked token per caption
    mlm_labels = torch.where(picked, words, -100)
    attention_mask = (position < length).long()
    input_ids = torch.where(picked, MASK_ID, words) * attention_mask  # [PAD] = 0
    matched = torch.arange(batch) % 2 == 0  # half the pairs mismatched
    x1y1 = torch.rand(batch, num_objects, 2, generator=g) * 0.8
    x2y2 = (x1y1 + 0.05 + 0.15 * torch.rand(batch, num_objects, 2, generator=g)).clamp(max=1.0)
    obj_mask = torch.rand(batch, num_objects, generator=g) < MASK_PROB
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        visual_feats=None,  # made on the device below: at large batches it is most of the batch
        visual_pos=torch.cat([x1y1, x2y2], dim=-1),
        mlm_labels=mlm_labels,
        obj_mask=obj_mask,
        obj_labels=torch.randint(cfg.num_object_labels, (batch, num_objects), generator=g),
        obj_confs=torch.rand(batch, num_objects, generator=g),
        attr_labels=torch.randint(cfg.num_attribute_labels, (batch, num_objects), generator=g),
        attr_confs=torch.rand(batch, num_objects, generator=g),
        itm_labels=matched.long(),
        qa_labels=torch.where(
            torch.arange(batch) % 4 == 0, torch.randint(cfg.num_qa_labels, (batch,), generator=g), -100
        ),
    )
    num_mlm = int(((mlm_labels != -100) & matched[:, None]).sum())
    num_obj = int((obj_mask & matched[:, None]).sum())
    on_device = {k: (v.to(device) if v is not None else None) for k, v in inputs.items()}
    # Detector features are post-ReLU and stored in fp16 (DESIGN.md 4).
    feats_generator = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, num_objects, cfg.visual_feat_dim)
    on_device["visual_feats"] = torch.randn(shape, generator=feats_generator, device=device, dtype=torch.half).relu_()
    return Batch(on_device, lengths, num_mlm, num_obj)


def pack_text(batch: Batch) -> Batch:
    """The same batch with its text packed: a PackedText as input_ids, packed mlm_labels, no mask."""
    from semvlp.model import PackedText

    inputs = dict(batch.inputs)
    real = inputs["attention_mask"].bool()
    offsets = torch.tensor([0, *torch.tensor(batch.lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = PackedText(inputs["input_ids"][real], offsets.to(real.device), max(batch.lengths))
    inputs.update(input_ids=packed, attention_mask=None, mlm_labels=inputs["mlm_labels"][real])
    return Batch(inputs, batch.lengths, batch.num_mlm, batch.num_obj)


# ---------------------------------------------------------------- model FLOPs


def semvlp_step_flops(cfg, batch: Batch, mode: str) -> float:
    """Model FLOPs of one training step (forward + backward) of SemVLPForPreTraining (semvlp/flops.py)."""
    return training_step_flops(cfg, batch.lengths, mode, batch.num_mlm, batch.num_obj)


def counted_step_flops(forward: Callable[[], torch.Tensor]) -> float:
    """Executed matmul FLOPs of one forward + backward, measured by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        forward().backward()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------- one training step


class TrainStep:
    """forward -> backward -> AdamW, with DeepSpeed-style mixed precision (see module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        precision: str,
        amp: str,
        device: torch.device,
        lr: float = 1e-4,
        grad_clip: float = GRAD_CLIP,
    ):
        self.dtype = DTYPES[precision]
        low = self.dtype != torch.float32
        self.cast = low and amp == "cast"
        self.autocast = low and amp == "autocast"
        self.device = device
        self.grad_clip = grad_clip
        if self.cast:
            model.to(self.dtype)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.cast:
            self.masters = [p.detach().float().clone() for p in self.params]
            self.master_grads = [torch.zeros_like(m) for m in self.masters]
        else:
            self.masters = self.params
        self.zero_grads: dict[int, torch.Tensor] = {}  # for params a mode leaves unused (no cast)
        self.optimizer = _adamw(self.masters, lr, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None
        self.model = model

    @property
    def param_dtype(self) -> torch.dtype:
        return self.dtype if self.cast else torch.float32

    def __call__(self, forward: Callable[[], torch.Tensor], clock: Clock) -> tuple[torch.Tensor, object]:
        """One step; returns (loss, the clock mark taken between backward and the optimizer)."""
        ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.autocast else contextlib.nullcontext()
        with ctx:
            loss = forward()
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        mid = clock.mark()
        # Params a mode leaves unused (cross-attention in single-stream) have no grad. DeepSpeed's ZeRO
        # optimizer steps its flat partitions whole, zeros where nothing flowed, so they step here too.
        if self.cast:
            sources, targets, unused = [], [], []
            for param, master, buffer in zip(self.params, self.masters, self.master_grads, strict=True):
                master.grad = buffer
                if param.grad is None:
                    unused.append(buffer)
                else:
                    sources.append(param.grad)
                    targets.append(buffer)
            torch._foreach_copy_(targets, sources)
            if unused:
                torch._foreach_zero_(unused)
        else:
            for i, param in enumerate(self.params):
                if param.grad is None:
                    if i not in self.zero_grads:  # made once: zeros it stays (clipping scales it in place)
                        self.zero_grads[i] = torch.zeros_like(param)
                    param.grad = self.zero_grads[i]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clipping needs the true gradients
        if self.grad_clip:  # the ds_configs' gradient_clipping: a global norm and a rescale every step
            torch.nn.utils.clip_grad_norm_(self.masters, self.grad_clip, foreach=True)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.cast:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)
        self.model.zero_grad(set_to_none=True)
        return loss, mid


def _adamw(params: list[torch.Tensor], lr: float, device: torch.device) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device / dtype
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, foreach=True)


class Clock:
    """CUDA events on a GPU (no sync until `sync`), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class Nvml:
    """pynvml readings of the benchmark's GPU; `reason` says why there are none."""

    def __init__(self, device: torch.device):
        self.handle, self.reason = None, None
        if device.type != "cuda":
            self.reason = "not a CUDA device"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = torch.cuda.current_device()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
            if visible[0].strip().isdigit():
                index = int(visible[index].strip())
            self.pynvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # pynvml missing, no driver access, MIG, ...
            self.reason = f"{type(exc).__name__}: {exc}"

    def read(self) -> dict | None:
        if self.handle is None:
            return None
        nv, h = self.pynvml, self.handle
        try:
            util = nv.nvmlDeviceGetUtilizationRates(h)
            memory = nv.nvmlDeviceGetMemoryInfo(h)
            return {
                "gpu_util_pct": util.gpu,
                "mem_util_pct": util.memory,
                "mem_used_gib": memory.used / 2**30,
                "sm_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                "power_w": nv.nvmlDeviceGetPowerUsage(h) / 1000,
            }
        except Exception as exc:
            self.reason = f"{type(exc).__name__}: {exc}"
            return None


def semvlp_forward_for(call: Callable, batch: Batch, mode: str) -> Callable[[int], Callable[[], torch.Tensor]]:
    """Step i's forward closure; "alternate" runs single-stream on even steps, two-stream on odd ones."""
    step_modes = ("single", "two") if mode == "alternate" else (mode,)

    def forward_for(i: int) -> Callable[[], torch.Tensor]:
        step_mode = step_modes[i % len(step_modes)]
        return lambda: call(**batch.inputs, mode=step_mode).loss

    return forward_for


def time_steps(
    train: TrainStep,
    forward_for: Callable[[int], Callable[[], torch.Tensor]],
    device: torch.device,
    warmup: int,
    steps: int,
    repeats: int,
    nvml: Nvml,
) -> dict:
    """Warm up, then time `repeats` x `steps` steps; `forward_for(i)` is step i's forward closure."""
    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    first, loss = None, None
    for i in range(warmup):
        loss, _ = train(forward_for(i), clock)
        if i == 0:  # compilation and autotuning land here
            clock.sync()
            first = time.perf_counter() - start
    clock.sync()
    warmup_s = time.perf_counter() - start
    repeat_ms, fwd_bwd_ms, optim_ms, readings = [], [], [], []
    for _ in range(repeats):
        marks = []
        for i in range(steps):
            start = clock.mark()
            loss, mid = train(forward_for(i), clock)
            marks.append((start, mid, clock.mark()))
        reading = nvml.read()  # before the sync: the GPU is still busy with this repeat
        clock.sync()
        repeat_ms.append(clock.ms(marks[0][0], marks[-1][2]) / steps)
        fwd_bwd_ms += [clock.ms(a, b) for a, b, _ in marks]
        optim_ms += [clock.ms(b, c) for _, b, c in marks]
        if reading:
            readings.append(reading)
    median = statistics.median(repeat_ms)
    result = {
        "ms_per_step": median,
        "ms_min": min(repeat_ms),
        "ms_max": max(repeat_ms),
        "spread_pct": 100 * (max(repeat_ms) - min(repeat_ms)) / median,
        "ms_repeats": repeat_ms,
        "fwd_bwd_ms": statistics.median(fwd_bwd_ms),
        "optimizer_ms": statistics.median(optim_ms),
        "first_step_s": first,
        "warmup_s": warmup_s,
        "loss": float(loss.detach().float()) if loss is not None else None,
    }
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    if readings:
        result["nvml"] = {k: statistics.median(r[k] for r in readings) for k in readings[0]}
    return result


def device_time(train: TrainStep, forward_for, device: torch.device, ms_per_step: float) -> dict:
    """CUDA: the GPU's kernel time per step over two more steps (one of each mode when alternating),
    and the share of the step's wall time it fills: well below 100% the step is host-bound (kernel
    launches, Python) or stalls at host syncs, and faster kernels will not make it faster. Runs after
    the timed steps' loss was read: under CUDA graphs a later replay overwrites that output."""
    if device.type != "cuda":
        return {}
    clock, steps = Clock(device), iter(range(2))
    try:
        per_step = device_ms(lambda: train(forward_for(next(steps)), clock), device, calls=2)
    except Exception as exc:  # the profiler is a diagnostic: its failure must not cost the run
        return {"device_time_error": _error(exc)}
    return {"device_ms_per_step": per_step, "gpu_busy_pct": 100 * per_step / ms_per_step}


# ---------------------------------------------------------------- the run


def git_commit() -> dict:
    """HEAD and whether tracked files differ from it; SEMVLP_GIT_COMMIT wins when set (copied trees)."""
    if os.environ.get("SEMVLP_GIT_COMMIT", "unknown") != "unknown":
        return {"commit": os.environ["SEMVLP_GIT_COMMIT"], "dirty": None}

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--verify", "-q", "HEAD")
        if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
            raise ValueError(commit)
        return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, ValueError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers", "deepspeed", "semvlp", "nvidia-ml-py"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count,
        }
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        name = f"{models[0]} x{len(models)}" if models else name
    return {"type": "cpu", "name": name, "threads": torch.get_num_threads()}


def backend_available(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if `select_ops` accepts the backend on this device and dtype, else the reason it does not."""
    from semvlp_kernels.dispatch import select_ops

    try:
        select_ops(backend, device, dtype)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def packed_attention(backend: str | None = None, device: torch.device | None = None, dtype=None) -> str:
    """Which attention the padding study's "packed" layout ran (None: it has not run)."""
    from semvlp_kernels.dispatch import select_ops, varlen_attention_triton_or_fallback

    if backend is None:
        return "not measured: the padding study's 'packed' layout (--padding-study) drives the model's packed path"
    if select_ops(backend, device, dtype).varlen_attention is varlen_attention_triton_or_fallback:
        how = "the Triton varlen kernel (sequences <= 128 tokens, head dims 16-128; else padded)"
    else:
        how = "padded attention: packed tokens scattered to [B, longest] and back, only the rest is padding-free"
    return f"measured: 'packed' padding-study rows on {backend} ran {how}"


class Runner:
    """Builds models, runs the plan in priority order within the time budget, and writes the JSON."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        self.deadline = time.monotonic() + args.time_budget if args.time_budget else math.inf
        self.cuda_lost: str | None = None  # set once a CUDA error has poisoned the context
        self.nvml = Nvml(device)
        info = device_info(device)
        self.doc: dict = {
            "schema": SCHEMA,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": git_commit(),
            "device": info,
            "versions": versions(),
            "argv": sys.argv[1:],
            "settings": {
                "preset": args.preset,
                "batch_size": args.batch_size,
                "precisions": args.precision,
                "amp": args.amp,
                "warmup": args.warmup,
                "steps": args.steps,
                "repeats": args.repeats,
                "text": args.text,
                "max_text_len": args.max_text_len,
                "gradient_checkpointing": args.gradient_checkpointing,
                "grad_clip": args.grad_clip,
                "optimizer": "torch.optim.AdamW (fused when available), fp32 master weights under --amp cast; "
                "parameters unused by a mode step with zero gradients (as ZeRO's flat partitions)",
                "timing": "CUDA events per repeat" if device.type == "cuda" else "time.perf_counter per repeat",
                "step": "plain PyTorch forward + backward + optimizer step on a fixed on-device batch",
            },
            "flops_formula": (
                "per step: sum over matmuls of 6*rows*n_in*n_out (visual projection 4x) + "
                "12*d*s_q*s_k per attention layer and sequence; real tokens only; "
                "= 6*N + 12*L*d*s per token for one stream (see benchmarks/throughput.py)"
            ),
            "peak": {},
            "nvml": None if self.nvml.handle else self.nvml.reason,
            "backends": {},
            "runs": [],
            "ratios": [],
            "max_batch": None,
            "packed_attention": packed_attention(),
        }
        self.cfg = config_from_preset(args.preset)
        self.out_path = resolve_out(args.out, info, args)

    # -- bookkeeping

    def save(self) -> None:
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_finite(self.doc), indent=1, default=str, allow_nan=False) + "\n")
        os.replace(tmp, self.out_path)

    def skip_reason(self) -> str | None:
        """Why the next run must not start: the time budget is spent, or CUDA is unusable."""
        if self.cuda_lost:
            return f"CUDA context lost earlier ({self.cuda_lost})"
        if time.monotonic() > self.deadline:
            return "time budget spent"
        return None

    def error(self, run: dict, exc: BaseException) -> dict:
        reason = _error(exc)
        if self.device.type == "cuda" and any(s in reason for s in CUDA_FATAL):
            self.cuda_lost = reason[:120]
        self.free()
        return self.record({**run, "status": "error", "reason": reason})

    def record(self, run: dict) -> dict:
        self.doc["runs"].append(run)
        self.save()
        status = f"{run['ms_per_step']:.2f} ms/step" if run["status"] == "ok" else f"{run['status']}: {run['reason']}"
        label = f"{run['section']:9s} {run['model']:10s} {run['mode']:9s} {run['backend']:6s} {run['precision']}"
        print(f"[throughput] {label} compile={run['compile']} B={run['batch_size']} text={run['text']}: {status}")
        sys.stdout.flush()
        return run

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            with contextlib.suppress(Exception):  # a lost context cannot even empty its cache
                torch.cuda.empty_cache()

    # -- one measurement

    def measure(self, run: dict, train: TrainStep, forward_for, flops: float, batch: Batch, timing: tuple) -> dict:
        """Time one configuration; `timing` = (warmup, steps, repeats)."""
        if reason := self.skip_reason():
            return self.record({**run, "status": "skipped", "reason": reason})
        breaks_before = graph_breaks()
        try:
            result = time_steps(train, forward_for, self.device, *timing, self.nvml)
            if run["section"] in PROFILED_SECTIONS:  # the profiler costs seconds: only where it tells most
                result.update(device_time(train, forward_for, self.device, result["ms_per_step"]))
        except Exception as exc:
            return self.error(run, exc)
        seconds = result["ms_per_step"] / 1e3
        tokens = sum(self.cfg.num_objects + m for m in batch.lengths)
        # (None off CUDA.) A peer's FLOPs are counted, not model FLOPs: no MFU for it.
        peak = self.doc["peak"].get(run["precision"], {}).get("tflops") if run["model"] == "semvlp" else None
        tflops = flops / seconds / 1e12
        finite = result["loss"] is not None and math.isfinite(result["loss"])
        run = {**run, **result, "status": "ok" if finite else "error"}
        if run["compile"]:  # met while compiling this run's step: each splits the compiled step in two
            run["graph_break_reasons"] = graph_breaks(since=breaks_before)
            run["graph_breaks"] = sum(run["graph_break_reasons"].values())
        run.update(
            warmup=timing[0],
            steps=timing[1],
            repeats=timing[2],
            samples_per_s=batch.size / seconds,
            tokens_per_s=tokens / seconds,
            flops_per_step=flops,
            tflops=tflops,
            mfu=tflops / peak if peak else None,
        )
        if not finite:
            run["reason"] = f"non-finite loss {result['loss']}"
        return self.record(run)

    # -- our model

    def build_ours(self, backend: str, precision: str, compile_: bool):
        from semvlp.model import SemVLPForPreTraining, enable_activation_checkpointing

        cfg = config_from_preset(self.args.preset, kernel_backend=backend)
        torch.manual_seed(0)
        with self.device:
            model = SemVLPForPreTraining(cfg)
        model.train()
        if self.args.gradient_checkpointing:
            enable_activation_checkpointing(model)
        train = TrainStep(model, precision, self.args.amp, self.device, grad_clip=self.args.grad_clip)
        mode = None if self.args.compile_mode == "default" else self.args.compile_mode
        call = torch.compile(model, mode=mode) if compile_ else model
        return train, call

    def run_ours(
        self,
        section: str,
        backend: str,
        precision: str,
        compile_: bool,
        modes: list[str],
        layouts: list[str],
        batch_size: int,
        timing: tuple | None = None,
    ) -> list[dict]:
        """Every (text layout, mode) on one model; returns the runs."""
        timing = timing or (self.args.warmup, self.args.steps, self.args.repeats)
        base = dict(section=section, model="semvlp", backend=backend, precision=precision, compile=compile_)
        base["gradient_checkpointing"] = self.args.gradient_checkpointing
        base["compile_mode"] = self.args.compile_mode if compile_ else None
        base["batch_size"] = batch_size
        grid = [{**base, "mode": mode, "text": layout} for layout in layouts for mode in modes]
        if reason := self.skip_reason():
            return [self.record({**run, "status": "skipped", "reason": reason}) for run in grid]
        try:
            train, call = self.build_ours(backend, precision, compile_)
        except Exception as exc:
            return [self.error(run, exc) for run in grid]
        runs, batches, first_layout = [], {}, {}
        for run in grid:
            failed = [r for r in runs if r["status"] == "error"]
            if compile_ and failed:  # a model that failed to compile once fails again, slowly
                runs.append(
                    self.record({**run, "status": "skipped", "reason": f"compile failed: {failed[0]['reason']}"})
                )
                continue
            lengths, pad_to = text_lengths(run["text"], batch_size, self.args.max_text_len, seed=0)
            text_pad_to = None if run["text"] == "packed" else pad_to  # packed: no padding at all
            layout = first_layout.setdefault((tuple(lengths), text_pad_to), run["text"])
            if layout != run["text"]:  # e.g. "longest" padded to 20 as pad20: the run would repeat that one
                reason = f"the same batch as text layout {layout!r}"
                runs.append(self.record({**run, "status": "skipped", "reason": reason, "same_as": layout}))
                continue
            if run["text"] not in batches:
                batches.clear()  # one batch alive at a time
                batch = make_batch(self.cfg, lengths, pad_to, self.device)
                batches[run["text"]] = pack_text(batch) if run["text"] == "packed" else batch
            batch = batches[run["text"]]
            run.update(text_pad_to=text_pad_to, text_mean_len=statistics.mean(batch.lengths))
            flops = semvlp_step_flops(self.cfg, batch, run["mode"])
            runs.append(self.measure(run, train, semvlp_forward_for(call, batch, run["mode"]), flops, batch, timing))
        del train, call, batches
        if compile_:
            torch._dynamo.reset()
        self.free()
        return runs

    # -- peers

    def run_peer(self, name: str, precision: str, batch_size: int) -> dict:
        run = self._run_peer(name, precision, batch_size)
        self.free()  # the peer's model and optimizer are gone with _run_peer's frame
        return run

    def _run_peer(self, name: str, precision: str, batch_size: int) -> dict:
        run = dict(section="peer", model=name, mode=PEER_MODE[name], backend="eager", precision=precision)
        run.update(compile=False, compile_mode=None, batch_size=batch_size, text=self.args.text)
        run["flops_source"] = "torch.utils.flop_counter: executed FLOPs, not model FLOPs (no MFU)"
        if reason := self.skip_reason():
            return self.record({**run, "status": "skipped", "reason": reason})
        try:
            torch.manual_seed(0)
            with self.device:
                model = build_peer(name, self.cfg)
            model.train()
            train = TrainStep(model, precision, self.args.amp, self.device, grad_clip=self.args.grad_clip)
            lengths, pad_to = text_lengths(self.args.text, batch_size, self.args.max_text_len, seed=0)
            batch = make_batch(self.cfg, lengths, pad_to, self.device)
            forward = peer_forward(model, peer_inputs(name, batch.inputs, train.param_dtype))
            ctx = torch.autocast(self.device.type, dtype=train.dtype) if train.autocast else contextlib.nullcontext()
            with ctx:
                flops = counted_step_flops(forward)
            model.zero_grad(set_to_none=True)
        except Exception as exc:
            return self.error(run, exc)
        timing = (self.args.warmup, self.args.steps, self.args.repeats)
        return self.measure(run, train, lambda i: forward, flops, batch, timing)

    # -- largest micro-batch

    def find_max_batch(self, backend: str, precision: str) -> int | None:
        """Double the micro-batch from --batch-size until one single- and one two-stream step run out of memory."""
        args = self.args
        info = {"backend": backend, "precision": precision, "tried": [], "largest": None}
        self.doc["max_batch"] = info
        if reason := self.skip_reason():
            info["stopped"] = reason
            self.save()
            return None
        try:
            train, call = self.build_ours(backend, precision, compile_=False)
        except Exception as exc:
            info["stopped"] = _error(exc)
            self.save()
            return None
        clock = Clock(self.device)
        size = args.batch_size
        while True:
            if size > args.max_batch_cap:
                info["stopped"] = f"reached --max-batch-cap {args.max_batch_cap}"
                break
            if reason := self.skip_reason():
                info["stopped"] = reason
                break
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                lengths, pad_to = text_lengths(args.text, size, args.max_text_len, seed=0)
                batch = make_batch(self.cfg, lengths, pad_to, self.device)
                forward_for = semvlp_forward_for(call, batch, "alternate")  # alternate needs both modes to fit
                for i in range(2):
                    train(forward_for(i), clock)
                clock.sync()
                peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
                info["tried"].append({"batch_size": size, "fits": True, "peak_mem_gib": peak})
                info["largest"] = size
            except torch.cuda.OutOfMemoryError as exc:
                info["tried"].append({"batch_size": size, "fits": False, "reason": str(exc).splitlines()[0][:200]})
                break
            except Exception as exc:  # not a memory limit: stop and say why
                info["tried"].append({"batch_size": size, "fits": False, "reason": _error(exc)})
                if self.device.type == "cuda" and any(s in _error(exc) for s in CUDA_FATAL):
                    self.cuda_lost = _error(exc)[:120]
                break
            finally:
                batch = forward_for = None
                train.model.zero_grad(set_to_none=True)
                self.free()
            self.save()  # a run killed mid-search (gpu_check's stage limit) keeps the sizes tried so far
            size *= 2
        del train, call
        self.free()
        self.save()
        return info["largest"]

    # -- the plan

    def run(self) -> None:
        """Measure in priority order, so that a time budget or a crash loses the least important runs.

        1. the main grid of the first available backend, first precision; 2. the peers (same batch and
        precision); 3. the main grid of the other backends; 4. the text padding study on the fastest
        backend (or --padding-backend's); 5. the largest micro-batch, and the main modes there; 6. the
        other precisions; 7. torch.compile variants (--compile both).
        """
        args, device = self.args, self.device
        first = args.precision[0]
        available: dict[str, list[str]] = {}
        for precision in args.precision:
            for backend in args.backends:
                reason = backend_available(backend, device, DTYPES[precision])
                self.doc["backends"][f"{backend}/{precision}"] = reason or "available"
                if reason is None:
                    available.setdefault(precision, []).append(backend)
            peak, source = peak_tflops(self.doc["device"]["name"], precision)
            self.doc["peak"][precision] = {"tflops": peak if device.type == "cuda" else None, "source": source}
        self.save()
        if not available.get(first):
            print(f"[throughput] none of {args.backends} is available for {first} on {device}: nothing to measure")
            return
        compiled = args.compile == "on"
        backends = available[first]

        self.run_ours("main", backends[0], first, compiled, args.modes, [args.text], args.batch_size)
        for name in args.peers:
            self.run_peer(name, first, args.batch_size)
        for backend in backends[1:]:
            self.run_ours("main", backend, first, compiled, args.modes, [args.text], args.batch_size)
        self.doc["ratios"] = self.ratios()
        self.save()
        best = self.best_backend(first, compiled) or backends[0]
        if args.padding_study:
            padding = best
            if args.padding_backend in backends:
                padding = args.padding_backend
            elif args.padding_backend != "fastest":
                print(f"[throughput] --padding-backend {args.padding_backend} is unavailable: the study runs on {best}")
            self.run_ours("padding", padding, first, False, args.padding_modes, list(LAYOUTS), args.batch_size)
            self.doc["packed_attention"] = packed_attention(padding, device, DTYPES[first])
        if args.find_max_batch:
            largest = self.find_max_batch(best, first)
            if largest and largest != args.batch_size:
                # Fewer steps at the large size: about the same time per run as the main grid.
                steps = max(2, args.steps * args.batch_size // largest)
                timing = (min(args.warmup, 2), steps + steps % 2, min(args.repeats, 3))
                self.run_ours("max_batch", best, first, False, args.modes, [args.text], largest, timing)
        for precision in args.precision[1:]:
            for backend in available.get(precision, []):
                self.run_ours("main", backend, precision, compiled, args.modes, [args.text], args.batch_size)
        if args.compile == "both":
            for precision in args.precision:
                for backend in available.get(precision, []):
                    self.run_ours("compiled", backend, precision, True, args.modes, [args.text], args.batch_size)
        self.doc["ratios"] = self.ratios()
        self.save()

    def best_backend(self, precision: str, compile_: bool) -> str | None:
        """The backend of the fastest single-stream main run (any mode if single-stream was not run)."""
        ok = [r for r in self.doc["runs"] if r["section"] == "main" and r["status"] == "ok"]
        ok = [r for r in ok if r["precision"] == precision and r["compile"] == compile_]
        if not ok:
            return None
        return max(ok, key=lambda r: (r["mode"] == "single", r["samples_per_s"]))["backend"]

    def ratios(self) -> list[dict]:
        """ours / peer samples/s: our best run of the peer's mode, and our eager run, same batch and precision."""
        out = []
        runs = [r for r in self.doc["runs"] if r["status"] == "ok"]
        for peer in (r for r in runs if r["section"] == "peer"):
            ours = [r for r in runs if r["model"] == "semvlp" and r["section"] in ("main", "compiled")]
            same = ("mode", "precision", "batch_size", "text")
            ours = [r for r in ours if all(r[k] == peer[k] for k in same)]
            if not ours:
                continue
            best = max(ours, key=lambda r: r["samples_per_s"])
            eager = [r for r in ours if r["backend"] == "eager" and not r["compile"]]
            out.append(
                {
                    "peer": peer["model"],
                    "mode": peer["mode"],
                    "precision": peer["precision"],
                    "batch_size": peer["batch_size"],
                    "peer_samples_per_s": peer["samples_per_s"],
                    "ours_backend": best["backend"],
                    "ours_compile": best["compile"],
                    "ours_samples_per_s": best["samples_per_s"],
                    "ratio": best["samples_per_s"] / peer["samples_per_s"],
                    "ratio_eager": eager[0]["samples_per_s"] / peer["samples_per_s"] if eager else None,
                }
            )
        return out


# ---------------------------------------------------------------- output


def resolve_out(out: str, info: dict, args: argparse.Namespace) -> Path:
    path = Path(out)
    if path.suffix == ".json":
        return path
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = info["name"].replace("NVIDIA ", "").replace("(R)", "").replace("(TM)", "")
    device = "-".join("".join(c if c.isalnum() else " " for c in name).lower().split())
    return path / f"throughput-{device or info['type']}-{args.preset}-b{args.batch_size}-{stamp}.json"


def _finite(value):
    """`value` with every NaN or inf float as None: json writes them as bare NaN / Infinity, which is not JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _error(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}{where}"


# ---------------------------------------------------------------- CLI


def _csv(choices: tuple[str, ...] | None):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if choices and t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {choices}")
        return items

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="base" if cuda else "tiny",
        help="model preset (default: base GPU, tiny CPU)",
    )
    p.add_argument("--batch-size", type=int, default=64 if cuda else 4, help="micro-batch (default 64 GPU, 4 CPU)")
    p.add_argument("--modes", type=_csv(MODES), default=list(MODES), help="comma list of single,two,alternate")
    p.add_argument("--backends", type=_csv(BACKENDS), default=list(BACKENDS), help="comma list of eager,sdpa,triton")
    # without emulation: torch would say yes on a V100, where bf16 has no tensor cores
    default_precision = (
        ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16") if cuda else "fp32"
    )
    p.add_argument("--precision", type=_csv(tuple(DTYPES)), default=[default_precision], help="comma list; first first")
    p.add_argument("--amp", choices=("cast", "autocast"), default="cast", help="how bf16/fp16 run (module docstring)")
    p.add_argument("--warmup", type=int, default=5 if cuda else 1, help="untimed steps first (>= 2 for alternate)")
    p.add_argument("--steps", type=int, default=10 if cuda else 2, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5 if cuda else 3, help="timed repeats (median reported)")
    p.add_argument("--text", choices=("full", "pad20", "longest"), default="full", help="text layout of the main runs")
    p.add_argument("--max-text-len", type=int, default=20)
    p.add_argument("--grad-clip", type=float, default=GRAD_CLIP,
                   help=f"global gradient norm clipped to in every step, as the ds_configs' gradient_clipping "
                   f"(default {GRAD_CLIP}; 0: none)")  # fmt: skip
    p.add_argument("--compile", choices=("off", "on", "both"), default="off", help="torch.compile the model")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode; reduce-overhead replays CUDA graphs (no launch per kernel)")  # fmt: skip
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="our model under activation checkpointing (blocks recomputed in the backward)")  # fmt: skip
    p.add_argument("--peers", type=_csv(tuple(PEER_MODE)), nargs="?", const=list(PEER_MODE), default=[])
    p.add_argument("--padding-study", action="store_true", help="all text layouts (LAYOUTS), packed included")
    p.add_argument("--padding-modes", type=_csv(("single", "two")), default=["single", "two"])
    p.add_argument("--padding-backend", choices=("fastest", *BACKENDS), default="fastest",
                   help="backend of the padding study (fastest: the fastest main run's); falls back to fastest "
                   "when not available")  # fmt: skip
    p.add_argument("--find-max-batch", action="store_true", help="double the micro-batch until OOM, then run there")
    p.add_argument("--max-batch-cap", type=int, default=4096 if cuda else 16)
    p.add_argument("--time-budget", type=float, default=0, help="seconds; later runs are skipped (recorded) past it")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help=".json path, or a folder")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps, --repeats and --batch-size must be >= 1, --warmup >= 0")
    if "alternate" in args.modes and args.steps % 2:
        args.steps += 1  # alternate needs as many single as two-stream steps per repeat
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    runner = Runner(args, device)
    print(f"[throughput] writing {runner.out_path}")
    try:
        runner.run()
    finally:
        runner.save()
        print()
        print(format_tables(runner.doc))
    return 0 if all(r["status"] != "error" for r in runner.doc["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
