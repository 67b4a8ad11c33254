"""A projection, not a measurement: tokens/s per TPU v5e chip if the forward ran there at the
model-FLOP utilisation measured here."""

from __future__ import annotations

import transformers

from benchmarks.forward import QWEN25_05B, flops_per_token
from benchmarks.report import Figure

V5E_BF16_FLOPS = 197e12  # per chip, Google's published peak
WORKERS = {"v5e 1x1": 1, "v5e 2x2": 4, "v5e 2x4": 8}


def project(mfus: dict[str, float]) -> list[Figure]:
    """`mfus`: where each utilisation was measured -> the fraction of peak reached there."""
    per_token = flops_per_token(transformers.Qwen2Config(**QWEN25_05B), 1024)
    figures = []
    for source, mfu in mfus.items():
        per_chip = mfu * V5E_BF16_FLOPS / per_token
        chips = ", ".join(f"{name}: {per_chip * n / 1e6:.2f}M tok/s" for name, n in WORKERS.items())
        figures.append(Figure(
            "projection", f"Qwen2.5-0.5B, S=1024, on TPU v5e at the MFU of {source}",
            f"{per_token / 1e9:.2f} GFLOP/token, {mfu:.0%} of 197 TFLOP/s: {per_chip:,.0f} tok/s per chip "
            f"({1e9 / per_chip / 3600:.1f} chip-hours per billion tokens); {chips}", note="projection"))
    return figures
