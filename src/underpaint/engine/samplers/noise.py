"""Per-image random streams with A1111's seed semantics (CPU randn source, eta-noise-seed-delta 0).

Each image of a batch owns a CPU ``torch.Generator`` seeded with its own seed (``seed + i``). Its first draw is the
initial noise; every later draw (ancestral / DPM-fast noise) continues the same stream, so image ``i`` of a batch is
the same as a single run with seed ``seed + i``. Draws are float32 on CPU, then moved to the latent's device and
dtype, which makes results independent of the device the UNet runs on.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torchsde
from torch import Tensor

# torchsde rounds the tree's end points to the tree dtype (float32) and then warns when a query at exactly sigma_max
# lies a float32 ulp outside. A1111 builds the same float32 trees and gets the same (harmless) warning every step.
warnings.filterwarnings("ignore", message=r"Should have (ta|tb)>?<?=t[01]", module=r"torchsde\._brownian")


class NoiseSource:
    """One CPU generator per image, seeded with that image's seed."""

    def __init__(self, seeds: Sequence[int]) -> None:
        if len(seeds) == 0:
            raise ValueError("NoiseSource needs at least one seed")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"seeds must be non-negative integers, got {s!r}")
        self.seeds: tuple[int, ...] = tuple(seeds)
        self.generators: list[torch.Generator] = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]

    @classmethod
    def from_seeds(cls, seeds: Sequence[int]) -> NoiseSource:
        """Same as ``NoiseSource(seeds)``: generator i is ``torch.Generator("cpu").manual_seed(seeds[i])``."""
        return cls(seeds)

    def __len__(self) -> int:
        return len(self.seeds)

    def randn_like(self, x: Tensor) -> Tensor:
        """Standard normal noise shaped like ``x`` ([B, ...]); slice i comes from generator i."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch size {x.shape[0]} does not match the {len(self.generators)} seeds")
        shape = tuple(x.shape[1:])
        draws = [torch.randn(shape, generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(device=x.device, dtype=x.dtype)

    def advance(self, x: Tensor, count: int) -> None:
        """Consume ``count`` draws shaped like ``x`` per image without using them (on CPU only)."""
        shape = tuple(x.shape[1:])
        for g in self.generators:
            for _ in range(count):
                torch.randn(shape, generator=g, dtype=torch.float32)


class BrownianNoise:
    """Brownian-tree noise for DPM++ SDE: one ``torchsde.BrownianTree`` per image, seeded with the image seed.

    The trees live on CPU in float32 (A1111 with the CPU randn source draws Brownian increments as float32 CPU
    normals), so the path depends only on the seed and the sigma interval, not on the device or latent dtype.
    ``__call__(sigma, sigma_next)`` returns the normalised increment ``(W(sigma_next) - W(sigma)) / sqrt(|dsigma|)``.

    A tree query costs milliseconds of CPU (a ~24-level bridge descent per query), as much as a UNet step on a GPU.
    The query points of a sampler are known in advance, so ``prefetch`` computes them on one worker thread while
    the model runs. All queries, prefetched or not, run on that single thread in submission order, so the trees
    see exactly the sequential access pattern and results are identical to computing inline. Call ``close`` when
    done (it drops queries not yet started).
    """

    def __init__(self, x: Tensor, seeds: Sequence[int], sigma_min: float, sigma_max: float) -> None:
        if len(seeds) != x.shape[0]:
            raise ValueError(f"batch size {x.shape[0]} does not match the {len(seeds)} seeds")
        if not 0 < sigma_min < sigma_max:
            raise ValueError("BrownianNoise needs 0 < sigma_min < sigma_max")
        self._device = x.device
        self._dtype = x.dtype
        w0 = torch.zeros(tuple(x.shape[1:]), dtype=torch.float32)
        self._trees = [torchsde.BrownianTree(sigma_min, w0, sigma_max, entropy=s) for s in seeds]
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="brownian")
        self._pending: dict[tuple[float, float], deque[Future[Tensor]]] = {}

    def _query(self, sigma: float, sigma_next: float) -> Tensor:
        lo, hi = (sigma, sigma_next) if sigma < sigma_next else (sigma_next, sigma)
        w = torch.stack([tree(lo, hi) for tree in self._trees])
        if sigma > sigma_next:
            w = -w
        w = w / math.sqrt(abs(sigma_next - sigma))
        return w.to(device=self._device, dtype=self._dtype)

    def _submit(self, sigma: float, sigma_next: float) -> Future[Tensor]:
        return self._worker.submit(self._query, sigma, sigma_next)

    def prefetch(self, queries: Sequence[tuple[float, float]]) -> None:
        """Start computing these (sigma, sigma_next) queries, in this order, in the background."""
        for q in queries:
            self._pending.setdefault(q, deque()).append(self._submit(*q))

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        queue = self._pending.get((sigma, sigma_next))
        future = queue.popleft() if queue else self._submit(sigma, sigma_next)
        return future.result()

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        self._pending.clear()
