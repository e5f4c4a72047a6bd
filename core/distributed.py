"""Data-parallel runs on ``torch.distributed`` (gloo), launched by ``torchrun``.

``torchrun --nproc-per-node N -m toolchain.cli MODEL ...`` starts N copies of the CLI with
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment;
``init_from_env`` joins them into one gloo process group (every tensor here lives on the
CPU, so gloo also serves GPU machines). Without those variables (a plain ``ftbc-export``) or
with ``WORLD_SIZE=1`` nothing is set up and every function below is the identity: a single
process runs exactly the code it ran before.

What is parallel, and how results are combined (every rank ends with the same numbers):

* Rows are split into contiguous shards, rank r taking the r-th (``shard``). The threshold
  samples are split on whole forward chunks, so every rank's forwards see exactly the batches
  a single process sees.
* Sums and counts (FTBC's per-channel target means and spike rates, held-out errors and
  agreements, saturation and activity counts) are combined with ``all_reduce`` (``sum``).
  Counts are integers and combine exactly; float sums are reduced in float64, so they differ
  from a single process's by float64 rounding only (far below the float32 the schedules are
  kept in).
* Statistics that do not decompose (a percentile, the MSE-optimal threshold, which needs every
  value of a channel sorted) are computed from the gathered values (``gather_rows``): exact,
  identical on every rank, with the memory of a single-process run on the (at most 1024)
  threshold samples.
* Evaluation predictions are gathered in rank order, so accuracies are computed on the whole
  evaluation set exactly as a single process computes them.

Rank 0 alone writes outputs and runs the Lava verification (``is_main``). A rank that fails
exits non-zero; ``torchrun`` then stops the others and names the failed rank; a collective
that waits longer than the timeout (a peer gone without notice) raises on every rank.
"""
from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch

from core.errors import InputError

DEFAULT_TIMEOUT_S = 600.0
EXIT_CODE = 5  # the CLI's exit code when a peer rank failed or cannot be reached


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def launched() -> bool:
    """True when started by torchrun (or another launcher) with more than one process."""
    return env_world_size() > 1


def env_rank() -> int:
    """The launcher's rank for this process (0 without a launcher), known before set-up."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_peer_failure(exc: BaseException) -> bool:
    """An error of the process group itself (a peer closed the connection, a collective
    timed out, the rendezvous failed), as opposed to an error of this rank's own work."""
    import torch.distributed as dist
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        key in text for key in ("Gloo", "gloo", "Connection closed by peer", "Timed out",
                                "Connection reset by peer", "Socket Timeout"))


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group described by torchrun's environment (no-op for one process)."""
    if not launched() or _dist() is not None:
        return
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))


def shutdown() -> None:
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def is_main() -> bool:
    return rank() == 0


def shard(n: int, align: int = 1) -> slice:
    """This rank's contiguous share of ``n`` rows, cut on multiples of ``align``."""
    size = world_size()
    if size == 1:
        return slice(0, n)
    blocks = -(-n // align)
    lo, hi = (blocks * r // size for r in (rank(), rank() + 1))
    return slice(min(lo * align, n), min(hi * align, n))


def check_shardable(n: int, what: str, fix: str) -> None:
    """Every rank needs at least one of the ``n`` rows of ``what``: InputError otherwise."""
    if 0 < n < world_size():
        raise InputError(f"{what} has {n} sample(s), fewer than the {world_size()} ranks of "
                         f"this torchrun job; {fix} or start fewer ranks")


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a new tensor; the input is left alone)."""
    dist = _dist()
    if dist is None:
        return t
    out = t.detach().to("cpu").clone().contiguous()  # the gloo group reduces host tensors
    dist.all_reduce(out)
    return out.to(t.device)


def sum_int(value: int) -> int:
    return int(all_sum(torch.tensor([value], dtype=torch.int64))[0])


def mean(x: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of ``x`` over ``dims`` (None: all) taken over every rank's shard, in float64 (one
    all_reduce of the sums and the count). A single process gets the plain float64 mean.
    A bool ``x`` is counted exactly (``rate``)."""
    dims = tuple(range(x.dim())) if dims is None else tuple(dims)
    if x.dtype == torch.bool:
        return rate(x, dims)
    sums = x.to(torch.float64) if not dims else x.sum(dim=dims, dtype=torch.float64)
    return _mean_of_sums(sums, x.numel() // max(sums.numel(), 1))


def rate(x: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """Fraction of ones of a 0/1 tensor (bool, or floats holding 0.0 / 1.0, e.g. spikes)
    over ``dims`` and every rank's shard, float64. The counts are exact: integer sums, or
    float sums in the tensor's own dtype while every count fits its mantissa (sums of 0/1
    values below 2**24 are exact in float32 in any order, and ~2x faster than summing in
    float64); float64 otherwise."""
    dims = tuple(range(x.dim())) if dims is None else tuple(dims)
    per_count = int(np.prod([x.shape[d] for d in dims]))
    if not dims:  # (sum over no dimension: the values themselves)
        sums = x
    elif x.dtype == torch.bool:  # int32 counts cannot overflow below 2**31 (~1.6x faster)
        sums = x.sum(dim=dims, dtype=torch.int32 if x.numel() < 2 ** 31 else torch.int64)
    elif x.is_floating_point() and per_count <= 2 / torch.finfo(x.dtype).eps:  # 2**24 in f32
        sums = x.sum(dim=dims)
    else:
        sums = x.sum(dim=dims, dtype=torch.float64)
    return _mean_of_sums(sums.to(torch.float64), per_count)


def rate_of_counts(counts: torch.Tensor, per_count: int) -> torch.Tensor:
    """``rate`` from counts of ones already summed (exact integers, e.g. accumulated over
    time chunks) out of ``per_count`` values each: the same float64 result."""
    return _mean_of_sums(counts.to(torch.float64), per_count)


def _mean_of_sums(sums: torch.Tensor, count: int) -> torch.Tensor:
    if _dist() is None:  # one process: no collective (this sits in FTBC's per-step loop)
        return sums / count
    both = all_sum(torch.cat([sums.reshape(-1), torch.tensor([float(count)], dtype=torch.float64,
                                                             device=sums.device)]))
    return (both[:-1] / both[-1]).reshape(sums.shape)


def gather_rows(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` in rank order (sizes along ``dim`` may
    differ between ranks; the other dimensions and the dtype must agree)."""
    dist = _dist()
    if dist is None:
        return t
    t = t.movedim(dim, 0).contiguous()
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.int64))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest,) + tuple(t.shape[1:]), dtype=t.dtype)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    whole = torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])
    return whole.movedim(0, dim)


def gather_array(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """``gather_rows`` for numpy arrays."""
    if _dist() is None:
        return a
    return gather_rows(torch.from_numpy(np.ascontiguousarray(a)), axis).numpy()


def _failure_key(r: int) -> str:
    return f"ftbc/failed/{r}"


def report_failure(message: str) -> None:
    """Leave this rank's reason for stopping in the job's key-value store (best effort, before
    the rank exits), so that the ranks that lose contact with it can name it and say why."""
    dist = _dist()
    if dist is None:
        return
    try:
        dist.distributed_c10d._get_default_store().set(_failure_key(dist.get_rank()), message)
    except Exception:  # noqa: BLE001 - the store may be gone too; the message was printed
        pass


def failed_peers() -> dict[int, str]:
    """{rank: reason} of the other ranks that reported a failure (empty if none could)."""
    dist = _dist()
    if dist is None:
        return {}
    found = {}
    try:
        store = dist.distributed_c10d._get_default_store()
        for r in range(dist.get_world_size()):
            if r != dist.get_rank() and store.check([_failure_key(r)]):
                found[r] = store.get(_failure_key(r)).decode(errors="replace")
    except Exception:  # noqa: BLE001 - best effort: the caller falls back to a general message
        return {}
    return found
