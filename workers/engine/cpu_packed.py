"""oneDNN pre-packed linear layers for the CPU path.

Why: a speculative verify feeds γ+1 tokens per session, so the target's linears run with 2..64 rows. MKL's sgemm
for so few rows re-packs the whole weight matrix on every call and, measured on this project's CPU (one thread,
the shipped target's shapes), a 5-row product costs 2-5x a 1-row one: a verify of 5 tokens cost 1.7x a decode
step, which ate most of the speculative speed-up. Packing each weight once at load into oneDNN's blocked layout
(what torch.compile's CPU backend does) makes 1-9 rows cost about the same weight read: 5 rows of the 8192 x 384
LM head take 0.37 ms instead of 1.8 ms.

``pack_linears(model)`` swaps every ``nn.Linear`` for a ``PackedLinear`` holding the packed weight; it checks the
packed kernel against ``F.linear`` first and leaves the model alone when oneDNN is missing or disagrees.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

ROWS_HINT = 64  # oneDNN picks the blocked layout for this many rows; measured fast for 1..64 rows alike
MIN_IN_FEATURES = 256  # narrower layers (the 128-wide draft) lose more to oneDNN's per-call cost than they gain


def available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight pre-packed for oneDNN (inference only, float32 CPU)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), ROWS_HINT),
                                 persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _agrees(linear: nn.Linear, packed: PackedLinear) -> bool:
    x = torch.randn(5, linear.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = linear(x), packed(x)
    return out.shape == ref.shape and bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()))


def pack_linears(model: nn.Module) -> int:
    """Replace the model's float32 CPU ``nn.Linear`` layers by packed ones; returns how many were packed."""
    if not available():
        return 0
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and child.weight.device.type == "cpu"
               and child.weight.dtype == torch.float32 and child.in_features >= MIN_IN_FEATURES]
    if not targets:
        return 0
    try:
        first = PackedLinear(targets[0][2])
        if not _agrees(targets[0][2], first):
            return 0
    except RuntimeError:  # an oneDNN build without these kernels
        return 0
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
