"""A SYNTHETIC cost table from a roofline-ish formula, for use until ``specmq profile`` measures real hardware.

    python -m simulator.synthetic_profile configs/profiles/example-cpu.yaml

Target forward (ms) = overhead + max(weights / bandwidth, 2 * params * tokens / flops)
                      + batch * context * kv_bytes_per_token / bandwidth
Draft step (ms)     = the same with the draft model's figures and tokens = batch.
The numbers are plausible for a ~135M-parameter float32 target and a ~30M draft on a 16-core CPU; they are not
a measurement, and the file says so (``synthetic: true``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from workers.cost_table import write_table


@dataclass
class Roofline:
    params: float  # parameters
    bytes_per_param: float
    kv_bytes_per_token: float  # all layers, K and V
    bandwidth_gbs: float = 40.0
    flops_g: float = 400.0  # effective GFLOP/s
    overhead_ms: float = 2.0

    def forward_ms(self, batch: float, tokens: float, context: float) -> float:
        weights = self.params * self.bytes_per_param / (self.bandwidth_gbs * 1e9) * 1e3
        compute = 2 * self.params * tokens / (self.flops_g * 1e9) * 1e3
        kv = batch * context * self.kv_bytes_per_token / (self.bandwidth_gbs * 1e9) * 1e3
        return self.overhead_ms + max(weights, compute) + kv


TARGET = Roofline(params=135e6, bytes_per_param=4, kv_bytes_per_token=46_080)
DRAFT = Roofline(params=30e6, bytes_per_param=4, kv_bytes_per_token=12_288, overhead_ms=0.5)
BATCH = [1, 2, 4, 8, 16, 32, 64, 128]
TOKENS = [1, 4, 16, 64, 256, 512, 1024, 2048]
CONTEXT = [0, 256, 1024, 4096, 16384]


def main(path: str = "configs/profiles/example-cpu.yaml") -> None:
    target = [[[TARGET.forward_ms(b, max(t, b), c) for c in CONTEXT] for t in TOKENS] for b in BATCH]
    draft = [[DRAFT.forward_ms(b, b, c) for c in CONTEXT] for b in BATCH]
    write_table(path, model="synthetic-135M-fp32", device="cpu", dtype="float32",
                hardware="SYNTHETIC: roofline formula (40 GB/s, 400 GFLOP/s, 2 ms overhead), not measured",
                target_axes={"batch": BATCH, "tokens": TOKENS, "context": CONTEXT}, target_latency_ms=target,
                draft_axes={"batch": BATCH, "context": CONTEXT}, draft_latency_ms=draft,
                draft_model="synthetic-30M-fp32", synthetic=True,
                note="Synthetic placeholder written by simulator/synthetic_profile.py; replace with a table "
                     "measured by 'specmq profile'.")


if __name__ == "__main__":
    main(*sys.argv[1:])
