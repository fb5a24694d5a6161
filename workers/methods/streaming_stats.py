"""Exact whole-model statistics from a stream of tensors, in O(histogram) memory.

TIES trims each task vector globally: keep |τ| >= the k-th smallest magnitude over *all* of the task's entries.
We find that value exactly without holding a model in memory: the bit pattern of a non-negative float32 is ordered
like its value, so a histogram over the top 16 bits (pass 1) finds the bucket that holds rank k, and a histogram over
the low 16 bits of that bucket's members (pass 2) pins the exact value.
"""

from __future__ import annotations

import torch
from torch import Tensor

HIGH_BUCKETS = 1 << 15  # sign bit is 0 for magnitudes
LOW_BUCKETS = 1 << 16


def _bits(magnitudes: Tensor) -> Tensor:
    return magnitudes.float().contiguous().reshape(-1).view(torch.int32)


class StreamingKthSmallest:
    """Exact k-th smallest of many non-negative streams (one per task), in two passes over the data."""

    def __init__(self, ranks: list[int]) -> None:
        self.ranks = ranks  # 1-based rank per stream; <= 0 means "keep everything" (threshold 0)
        self.high = [torch.zeros(HIGH_BUCKETS, dtype=torch.int64) for _ in ranks]
        self.low = [torch.zeros(LOW_BUCKETS, dtype=torch.int64) for _ in ranks]
        self.bucket: list[int] = []
        self.rank_in_bucket: list[int] = []

    def observe_high(self, stream: int, magnitudes: Tensor) -> None:
        self.high[stream] += torch.bincount(_bits(magnitudes) >> 16, minlength=HIGH_BUCKETS).cpu()

    def finish_high(self) -> None:
        for hist, rank in zip(self.high, self.ranks):
            if rank <= 0:
                self.bucket.append(-1)
                self.rank_in_bucket.append(0)
                continue
            cumulative = torch.cumsum(hist, 0)
            if rank > int(cumulative[-1]):
                # searchsorted would point past the last bucket and the threshold's bits would not fit a float32
                raise ValueError(f"rank {rank} exceeds the {int(cumulative[-1])} values observed")
            b = int(torch.searchsorted(cumulative, torch.tensor(rank)).item())
            self.bucket.append(b)
            self.rank_in_bucket.append(rank - (int(cumulative[b - 1]) if b > 0 else 0))

    def observe_low(self, stream: int, magnitudes: Tensor) -> None:
        if self.bucket[stream] < 0:
            return
        bits = _bits(magnitudes)
        members = bits[(bits >> 16) == self.bucket[stream]]
        if members.numel():
            self.low[stream] += torch.bincount(members & 0xFFFF, minlength=LOW_BUCKETS).cpu()

    def thresholds(self) -> Tensor:
        out = []
        for hist, bucket, rank in zip(self.low, self.bucket, self.rank_in_bucket):
            if bucket < 0:
                out.append(0.0)
                continue
            low = int(torch.searchsorted(torch.cumsum(hist, 0), torch.tensor(rank)).item())
            bits = torch.tensor([(bucket << 16) | low], dtype=torch.int32)
            out.append(float(bits.view(torch.float32)))
        return torch.tensor(out, dtype=torch.float32)
