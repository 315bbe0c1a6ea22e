"""Fast inference plans per precision, built once and kept on the network they were made from."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
Plan = TypeVar("Plan")


def cached_plan(net: nn.Module, precision: str, build: Callable[[nn.Module, torch.dtype], Plan]) -> Plan:
    """`build(net, dtype)` for `precision` ("fp32" or "bf16") on first use, then the same plan (made from the weights
    the network had then); plans live in the network's `_plans` dict."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    plans = net.__dict__.setdefault("_plans", {})
    if precision not in plans:
        plans[precision] = build(net, PRECISIONS[precision])
    return plans[precision]
