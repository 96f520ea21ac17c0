"""Dense tensor-core peak TFLOP/s per device and precision, for MFU (model FLOPs utilization).

Only numbers from the vendor's datasheet are listed, dense (the datasheets' headline figures for
Ampere and Hopper are "with sparsity", i.e. 2x these). A device or precision that is not listed
gets no peak, and the benchmark then leaves MFU empty rather than guessing.

Sources:
- H100 SXM5 and H100 PCIe: NVIDIA H100 Tensor Core GPU datasheet (BF16/FP16 Tensor Core 1,979 /
  1,513 TFLOPS with sparsity -> 989 / 756 dense). torch names the SXM part "NVIDIA H100 80GB HBM3".
- H200 SXM: NVIDIA H200 datasheet, BF16/FP16 1,979 TFLOPS with sparsity -> 989 dense (same SMs
  and clocks as H100 SXM, more and faster memory).
- H200 NVL and GH200 are named but get no peak: their figures (the NVL part runs at lower power)
  were not checked against a datasheet here, and the H200 SXM figure would be wrong for the NVL.
- A100 (SXM4 and PCIe, 40/80 GB): NVIDIA A100 datasheet, BF16/FP16 Tensor Core 312 TFLOPS dense.
- V100 SXM2 / PCIe: NVIDIA V100 datasheet, Tensor (FP16) 125 / 112 TFLOPS; no bf16 on Volta.
- V100S PCIe: NVIDIA V100S datasheet, Tensor (FP16) 130 TFLOPS.
DESIGN.md section 5 quotes the same H100 and V100 figures.
A MIG slice ("... MIG 3g.40gb") gets no peak: it has a fraction of the device's SMs.
"""

from __future__ import annotations

import re

# (model, form-factor substrings, label, {precision: TFLOP/s}, source), first match wins. The model must
# be a whole word of the device name ("A100" is not "RTX A1000", "H200" not "GH200"); the substrings
# need only occur in it (torch says "A100-SXM4-80GB", "V100-PCIE-16GB", "H100 80GB HBM3").
PEAKS: list[tuple[str, tuple[str, ...], str, dict[str, float], str]] = [
    ("H100", ("PCIE",), "H100 PCIe", {"bf16": 756.0, "fp16": 756.0}, "NVIDIA H100 datasheet (PCIe), dense"),
    ("H100", ("HBM3",), "H100 SXM", {"bf16": 989.0, "fp16": 989.0}, "NVIDIA H100 datasheet (SXM5), dense"),
    ("H100", ("SXM",), "H100 SXM", {"bf16": 989.0, "fp16": 989.0}, "NVIDIA H100 datasheet (SXM5), dense"),
    ("H200", ("NVL",), "H200 NVL", {}, "not listed"),
    ("H200", (), "H200 SXM", {"bf16": 989.0, "fp16": 989.0}, "NVIDIA H200 datasheet (SXM), dense"),
    ("GH200", (), "GH200", {}, "not listed"),
    ("A100", (), "A100", {"bf16": 312.0, "fp16": 312.0}, "NVIDIA A100 datasheet, dense"),
    ("V100S", (), "V100S PCIe", {"fp16": 130.0}, "NVIDIA V100S datasheet (PCIe), tensor fp16"),
    ("V100", ("PCIE",), "V100 PCIe", {"fp16": 112.0}, "NVIDIA V100 datasheet (PCIe), tensor fp16"),
    ("V100", (), "V100 SXM2", {"fp16": 125.0}, "NVIDIA V100 datasheet (SXM2), tensor fp16"),
]


def peak_tflops(device_name: str, precision: str) -> tuple[float | None, str]:
    """(peak dense TFLOP/s or None, where the number comes from or why there is none)."""
    name = device_name.upper()
    words = set(re.split(r"[^A-Z0-9]+", name))
    if "MIG" in words:
        return None, f"{device_name!r} is a MIG slice, with a fraction of the device's peak (MFU left empty)"
    for model, substrings, label, table, source in PEAKS:
        if model in words and all(s in name for s in substrings):
            if precision in table:
                return table[precision], f"{label} {precision}: {source}"
            return None, f"{label}: no {precision} tensor-core peak listed (MFU left empty)"
    return None, f"unknown device {device_name!r}: no peak listed (MFU left empty)"
