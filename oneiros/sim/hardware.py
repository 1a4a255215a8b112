"""Hardware profiles for the simulator: peak numbers from spec sheets and published measurements,
and the efficiencies a real engine reaches against them (calibrated from step traces: `calibrate`).

Sources (peak figures, dense BF16 tensor-core FLOP/s, HBM bandwidth, host link):
  - GH200 (96 GB HBM3): NVIDIA GH200 Grace Hopper Superchip datasheet: 989 TFLOP/s BF16 dense, 4.0 TB/s
    HBM3, NVLink-C2C 900 GB/s total (450 GB/s each way). Host-link figures are the paper's measurements
    (Oneiros, SoCC 2025): ~427 GB/s one-way CPU->GPU, ~366 GB/s each way when reads and writes mix 1:1.
  - H100-SXM (80 GB HBM3): NVIDIA H100 datasheet: 989 TFLOP/s BF16 dense, 3.35 TB/s; PCIe Gen5 x16
    host link, 64 GB/s per direction theoretical; pinned copies reach ~53 GB/s one way (commonly
    measured with nvbandwidth / bandwidthTest), less when both directions run.
  - H100-PCIe (80 GB HBM2e): NVIDIA H100 datasheet: 756 TFLOP/s BF16 dense, 2.0 TB/s; PCIe Gen5 x16 as
    above.
  - H200 (SXM, 141 GB HBM3e): NVIDIA H200 datasheet: 989 TFLOP/s BF16 dense (1,979 with sparsity),
    4.8 TB/s HBM3e; PCIe Gen5 x16 host link, about 55 GB/s each way measured with pinned copies; the
    mixed figure assumes the H100's ratio of mixed to one-way (40/53).
  - A100-80G (SXM4): NVIDIA A100 datasheet: 312 TFLOP/s BF16 dense, 2.039 TB/s HBM2e; PCIe Gen4 x16,
    32 GB/s per direction theoretical, ~25 GB/s measured pinned one way.
  - cpu: this project's 2-core CI machine, running the PyTorch reference path in float32. Peak:
    2 cores x 2 FMA units x 8 float32 lanes x 2 FLOP x ~3 GHz = 192 GFLOP/s (AVX2); memory and copy
    figures are rough starting points: `oneiros calibrate` fits what the engine reaches.
Host memory is the host DRAM a GPU's share of its server has (DGX H100/H200: 2 TB for 8 GPUs; DGX
A100: 1 TB for 8; GH200: the Grace CPU's 480 GB LPDDR5X): the pinned host copies of every served
model's weights must fit it, and what does not is read by memory map from the cold tier, local NVMe
(one PCIe Gen4 x4 SSD reads about 7 GB/s sequentially; Gen5 x4 about 12 GB/s).
Efficiencies and overheads of the GPU profiles are typical of a tuned engine (decode reaches 60-80% of
HBM bandwidth, large prefills 50-70% of peak FLOP/s); calibrate them from a GPU trace when one exists.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from oneiros.core import ConfigError

GB = 1e9
TB = 1e12


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    memory_bytes: int  # device memory
    peak_flops: float  # FLOP/s at the model dtype
    mem_bw: float  # device memory bytes/s
    h2d_bw: float  # host->device bytes/s, one way (pinned)
    d2h_bw: float  # device->host bytes/s, one way
    mixed_bw: float  # bytes/s each way while both directions copy
    compute_eff: float = 0.6  # share of peak FLOP/s the engine reaches
    mem_eff: float = 0.7  # share of memory bandwidth
    overlap: float = 0.0  # 0: compute and memory time overlap fully (roofline max); 1: they add up
    step_overhead_s: float = 2e-4  # per step (scheduling, launches, sampling)
    layer_overhead_s: float = 1e-5  # per decoder layer per step (kernel launches)
    token_overhead_s: float = 0.0  # per token in the step (metadata, embeddings)
    seq_overhead_s: float = 0.0  # per sequence in the step (attention calls, sampling, bookkeeping)
    # per plan of two or more tokens: what matrix-matrix kernels cost beyond the matrix-vector ones
    # a one-token pass runs (a CPU's BLAS: 50-80 ms a step for SmolLM2 on a 2-core VM; ~0 on GPUs)
    multi_token_overhead_s: float = 0.0
    dtype_bytes: int = 2  # bytes per parameter and KV element
    async_copies: bool = True  # copies overlap compute (a copy stream); False: they add up
    host_memory_bytes: int = 0  # host DRAM for pinned master copies (0: unknown)
    cold_bw: float = 0.0  # bytes/s reading weights beyond host memory (memory-mapped NVMe; 0: none)
    source: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def slice(self, share: float, name: str) -> HardwareProfile:
        """A `share` of this device, as a MIG slice gets: memory, FLOP/s and memory bandwidth in
        proportion; the host link and the overheads stay."""
        return replace(
            self, name=name, memory_bytes=int(self.memory_bytes * share),
            peak_flops=self.peak_flops * share, mem_bw=self.mem_bw * share,
            source=f"{share:.0%} slice of {self.name}",
        )


PROFILES: dict[str, HardwareProfile] = {
    "gh200": HardwareProfile(
        "gh200", 96 * GB, 989 * TB, 4.0 * TB, 427 * GB, 427 * GB, 366 * GB,
        host_memory_bytes=480 * GB, cold_bw=12 * GB,
        source="GH200 datasheet; host link measured in the Oneiros paper",
    ),
    "h100-sxm": HardwareProfile(
        "h100-sxm", 80 * GB, 989 * TB, 3.35 * TB, 53 * GB, 53 * GB, 40 * GB,
        host_memory_bytes=256 * GB, cold_bw=7 * GB,
        source="H100 SXM datasheet; PCIe Gen5 x16 pinned-copy measurements",
    ),
    "h100-pcie": HardwareProfile(
        "h100-pcie", 80 * GB, 756 * TB, 2.0 * TB, 53 * GB, 53 * GB, 40 * GB,
        host_memory_bytes=256 * GB, cold_bw=7 * GB,
        source="H100 PCIe datasheet; PCIe Gen5 x16 pinned-copy measurements",
    ),
    "h200": HardwareProfile(
        "h200", 141 * GB, 989 * TB, 4.8 * TB, 55 * GB, 55 * GB, 41.5 * GB,
        host_memory_bytes=256 * GB, cold_bw=12 * GB,
        source="H200 SXM datasheet; PCIe Gen5 x16 pinned copies, ~55 GB/s each way measured",
    ),
    "a100-80g": HardwareProfile(
        "a100-80g", 80 * GB, 312 * TB, 2.039 * TB, 25 * GB, 25 * GB, 20 * GB,
        host_memory_bytes=128 * GB, cold_bw=7 * GB,
        source="A100 80GB SXM datasheet; PCIe Gen4 x16 pinned-copy measurements",
    ),
    "cpu": HardwareProfile(
        "cpu", 16 * GB, 192e9, 10 * GB, 8 * GB, 8 * GB, 6 * GB,
        compute_eff=1.0, mem_eff=1.0, overlap=1.0, step_overhead_s=2e-3, layer_overhead_s=2e-4,
        dtype_bytes=4, async_copies=False, host_memory_bytes=16 * GB, cold_bw=1 * GB, source="rough figures for a 2-core x86 VM; calibrate with `oneiros calibrate`",
    ),
}


def load_profile(name_or_path: str | HardwareProfile) -> HardwareProfile:
    """A shipped profile by name, or a JSON file written by `oneiros calibrate` (a profile object
    is returned as it is)."""
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    if name_or_path.lower() in PROFILES:
        return PROFILES[name_or_path.lower()]
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
        fields = set(HardwareProfile.__dataclass_fields__)
        unknown = set(data) - fields
        if unknown:
            raise ConfigError(f"hardware profile {path} has unknown fields: {sorted(unknown)}")
        try:
            return HardwareProfile(**data)
        except TypeError as e:
            raise ConfigError(f"hardware profile {path} is incomplete: {e}") from None
    raise ConfigError(
        f"unknown hardware {name_or_path!r}: use one of {', '.join(PROFILES)} or a profile .json file"
    )

