"""Data parallel for the trained methods, under the launchers people already use.

    accelerate launch --num_processes 4 -m erase run model.safetensors --concepts nudity
    torchrun --nproc-per-node 4 -m erase run model.safetensors --concepts nudity

Both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; erase joins the process group they describe
(NCCL on CUDA, gloo on the CPU) through torch.distributed directly, which is all Accelerate itself does for plain
data parallel, so Accelerate is not a dependency. Each rank trains `--batch-size` sample streams of its own
(erase.methods.base.TrainedMethod); after each backward the gradients of the trainable subset are averaged over the
ranks in one all-reduce, so every rank takes the same AdamW step and keeps the same weights and EMA (checked at the
end). Rank 0 alone writes the output and the report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from erase.errors import EraseError

NO_DATA_PARALLEL = "ERASE_NO_DATA_PARALLEL"  # set by `erase run --jobs`: under a launcher its ranks share jobs instead


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def join(device_type: str) -> World:
    """The launcher's process group (joined once), or a world of one process without a launcher."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size == 1 or os.environ.get(NO_DATA_PARALLEL):
        return World()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0)))
    if device_type == "cuda":  # before the group: NCCL binds each rank to the current device (else all share cuda:0)
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def launcher_note(environ=os.environ) -> str | None:
    """A warning when a launcher asked for several processes but this is the only one. `accelerate launch --cpu
    --num_processes N` needs MPI for N CPU processes; without it Accelerate starts one plain process (it sets
    MASTER_ADDR for the group it meant to start, but no WORLD_SIZE), which would train alone without a word."""
    if int(environ.get("WORLD_SIZE", 1)) > 1 or "ACCELERATE_USE_CPU" not in environ or "MASTER_ADDR" not in environ:
        return None
    return ("accelerate launch started one process: on a CPU, Accelerate needs MPI for several. Training on this process alone; for "
            "N processes use `accelerate launch --multi_gpu --num_processes N -m erase ...` (gloo ranks on a CPU too) or "
            "`torchrun --nproc-per-node N -m erase ...`")


def stream_seed(seed: int, index: int) -> int:
    """The seed of global sample stream `index` (stream 0 is the run's own generator, seeded with `seed`)."""
    return (seed * 1_000_003 + index * 7_919) % (2**63)


def sample_streams(generator: torch.Generator, seed: int, world: World, batch: int) -> list[torch.Generator]:
    """This rank's `batch` sample streams: global streams rank*batch ... rank*batch + batch - 1."""
    streams = []
    for i in range(batch):
        index = world.rank * batch + i
        streams.append(generator if index == 0 else torch.Generator().manual_seed(stream_seed(seed, index)))
    return streams


BUCKET_BYTES = 25 * 2**20  # per all-reduce, as DistributedDataParallel's default bucket: bounded extra memory
IN_FLIGHT = 2  # buckets being reduced at once


def average_gradients(params, world: World, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Every rank's gradients replaced by their mean over the ranks. The gradients go in buckets of about `bucket_bytes`,
    each flattened into its own buffer and all-reduced asynchronously, at most IN_FLIGHT at once: the extra memory is a
    few buckets, not a second copy of every gradient (SDXL's whole UNet: 10 GB), and one bucket's transfer overlaps the
    copies of the next."""
    if world.size == 1:
        return
    import torch.distributed as dist

    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets, current, size = [], [], 0
    for p in params:
        current.append(p)
        size += p.grad.numel() * p.grad.element_size()
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    pending = []

    def finish(bucket, flat, work) -> None:
        work.wait()
        flat /= world.size
        offset = 0
        for p in bucket:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    for bucket in buckets:
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        pending.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
        if len(pending) >= IN_FLIGHT:
            finish(*pending.pop(0))
    for item in pending:
        finish(*item)


def _device():
    """Where collectives take their tensors: NCCL needs them on the rank's GPU."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def values_on_ranks(values: list[float], world: World) -> list[list[float]]:
    """Every rank's `values`, in rank order, on every rank (one all-gather): the step's loss and whether Ctrl-C was pressed,
    so that a non-finite loss or an interrupt on any rank stops every rank at the same step."""
    if world.size == 1:
        return [list(values)]
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_device())
    gathered = [torch.zeros_like(t) for _ in range(world.size)]
    dist.all_gather(gathered, t)
    return [g.tolist() for g in gathered]


def from_main(value, world: World):
    """Rank 0's `value` on every rank (pickled: for small results computed once, like the encoded prompts)."""
    if world.size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_identical(tensors: dict[str, torch.Tensor], world: World, what: str) -> None:
    """Fail loudly if the ranks' copies of `tensors` differ in any bit (they must: every rank takes the same steps)."""
    if world.size == 1:
        return
    import torch.distributed as dist

    fingerprint = torch.stack([torch.stack([t.double().sum(), (t.double() * t.double()).sum(), t.double().abs().max()])
                               for t in tensors.values()]).reshape(-1).to(_device())
    gathered = [torch.zeros_like(fingerprint) for _ in range(world.size)]
    dist.all_gather(gathered, fingerprint)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise EraseError(f"data parallel: the ranks' {what} differ; refusing to write an output")


def same_on_every_rank(value: int, world: World) -> bool:
    if world.size == 1:
        return True
    import torch.distributed as dist

    gathered = [None] * world.size
    dist.all_gather_object(gathered, value)
    return all(v == gathered[0] for v in gathered)


def leave(world: World) -> None:
    """Wait for every rank (rank 0 has written the output), then close the group: a process that exits while a peer
    still holds the connection can abort the peer (seen with gloo)."""
    if world.size == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
