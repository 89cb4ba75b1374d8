"""What data parallelism over several GPUs adds to one GPU's plan (pure).

Under torchrun every GPU holds the whole model (DDP replicates it: the frozen base, the adapters and
their optimizer state), trains its share of every global batch, and after each optimizer step's
backward passes the LoRA gradients are all-reduced. So per GPU: the one-GPU memory plus DDP's flat
gradient buckets (one more copy of the LoRA gradients), and the one-GPU step time plus one ring
all-reduce of those gradients, 2 (N - 1) / N of their bytes over the slowest link between GPUs.
"""

from __future__ import annotations

# Nominal bandwidth each way between two GPUs of a kind (GB/s): NVLink on SXM parts, PCIe x16
# otherwise (vendors' datasheets). GeForce cards have no peer-to-peer path: their all-reduce goes
# through host memory over PCIe, which this nominal figure flatters.
LINK_GBS = {
    "A100 40GB": (300.0, "NVLink 3 (A100 SXM)"),
    "A100 80GB": (300.0, "NVLink 3 (A100 SXM)"),
    "H100 SXM": (450.0, "NVLink 4"),
    "H200": (450.0, "NVLink 4"),
    "H100 PCIe": (64.0, "PCIe 5.0 x16"),
}
PCIE4 = (32.0, "PCIe 4.0 x16")
NETWORK = (12.5, "a 100 Gb/s network between machines")
# Share of the nominal bandwidth a ring all-reduce reaches (NCCL's bus bandwidth is typically 70-80%).
ALLREDUCE_EFFICIENCY = 0.7


def link(device_name: str, nodes: int = 1) -> tuple[float, str]:
    """The slowest link a gradient crosses: between machines when there are several."""
    return NETWORK if nodes > 1 else LINK_GBS.get(device_name, PCIE4)


def allreduce_seconds(gradient_bytes: float, world_size: int, bandwidth_gbs: float) -> float:
    """One ring all-reduce: each GPU sends and receives 2 (N - 1) / N of the buffer."""
    if world_size <= 1:
        return 0.0
    moved = 2 * (world_size - 1) / world_size * gradient_bytes
    return moved / (ALLREDUCE_EFFICIENCY * bandwidth_gbs * 1e9)
