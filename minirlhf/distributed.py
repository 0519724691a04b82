"""Data parallel RLHF with torch.distributed: every process ("rank") does a share of one PPO step.

`torchrun --nproc_per_node=W train.py ...` starts W copies of the same program. torchrun gives each one
its place in environment variables (RANK = 0..W-1, WORLD_SIZE = W, LOCAL_RANK = its GPU on this machine),
and `init(device)` joins them into one process group: NCCL between GPUs, gloo between CPU processes. Every
rank holds the whole model (an int8 base plus small adapters), so data parallelism is the natural way to
use more devices: each rank works on its own rows of the batch, and the ranks exchange only what the math
needs. A PPO step, with B = --batch-size (the global batch) split into W equal slices of b = B / W rows:

    prompts      the same B prompts chosen on every rank (same seed, same generator)   -> rank r keeps
                 rows r*b .. (r+1)*b - 1, with the response lengths and sampling noise of those rows
    sample       local: b responses                                                  [b, N]
    reward       local: the reward function sees only this rank's rows (it may be a reward model)
    score pass   local: policy and reference log-probs, values                        [b, N]
    advantages   gathered: whitening subtracts the mean and divides by the std of *all* B rows'
                 tokens, so the small per-token tensors are all-gathered ([B, N], a few KB) and
                 every rank runs the same GAE + whitening on the whole batch
    statistics   computed on the gathered batch, so the logs describe the global batch
    update       each minibatch of M rows holds M / W rows of every rank; a rank runs the forward
                 and backward for its own rows only
    gradients    summed over ranks (`sum_gradients`), for the trainable parameters only: LoRA's A and B
                 and the value head. The frozen int8 base has no gradient and never travels.

Why the gradients are *summed*, and why each rank needs the whole minibatch's numbers. torch's
DistributedDataParallel averages gradients, because each rank's loss is a mean over its own rows; the
average of W such means is the global mean only when every rank's mean is over the same number of items.
PPO's losses are masked means over response *tokens*, and ranks hold different numbers of tokens
(responses have different lengths). So instead every rank computes the loss of the whole minibatch: the
other ranks' per-token log-probs and values arrive by all-gather as constants (`gather_rows`), and only its
own rows carry autograd history. The loss value is then the single-process loss, and its gradient on rank r
is the part that flows through rank r's rows; the parts add up, over ranks, to the single-process gradient.
Gradient clipping and AdamW then run on identical summed gradients on every rank, so the weights stay
identical without ever being sent.

What makes W ranks x b rows equal one process x B rows (tests/test_distributed.py checks adapter weights):
every random choice is a function of the seed and the *global* row, never of the rank. The prompt choice,
the B response lengths, the [B, max_new_tokens] uniform numbers that drive sampling and the minibatch
shuffle are drawn identically on every rank from the trainer's generator, and each rank reads its rows.
The same seed also gives every rank the same initial adapters. Dropout (off by default) is the exception:
its masks come from each process's own torch RNG, so with dropout a W-rank run is the same algorithm but
not the same numbers as one process.

Failures. A rank whose reward function raises must not leave the others waiting forever in the next
all-gather. Fallible local work runs through `guarded`, which always ends in one small collective that
carries every rank's error message (or None): if any rank failed, every rank raises at the same point
with a one-line message naming the failed rank, and nobody waits. As a backstop for the unforeseen (a rank
stuck or killed elsewhere), the process group has a timeout, and torchrun stops all ranks when one exits
with an error.

In one process nothing here does anything: no process group is made and every helper returns its input.
"""

import datetime
import os

import torch
import torch.distributed as dist
# Imported here, before any process group exists, on purpose. Its functions take `group=group.WORLD` as a
# default argument, evaluated at import time; torch imports it lazily (its compiler stack does, on the first
# op on the meta device, which load_model runs). Imported after init_process_group, those ten defaults would
# hold the process group forever: destroy_process_group could not free it, and gloo's worker threads would
# live on into interpreter shutdown, where one that drops a finished collective's tensors must take the GIL,
# is stopped instead, and aborts the process ("terminate called without an active exception").
# tests/test_distributed.py checks that no gloo thread outlives shutdown().
import torch.distributed.nn.functional  # noqa: F401

TIMEOUT = datetime.timedelta(minutes=10)  # backstop: a collective that waits longer than this raises


class RankError(RuntimeError):
    """Another rank failed; the message names it and says why."""


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (when WORLD_SIZE > 1) and return this rank's device.

    The device decides the backend: NCCL for GPUs, where each rank takes GPU number LOCAL_RANK (whatever
    cuda:N was asked for), gloo for CPUs. One process: nothing happens and `device` comes back.
    """
    if world_size() == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def shutdown() -> None:
    """Leave the process group and free it (its worker threads stop) while the interpreter is fully alive."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """How many processes run this job: torchrun's WORLD_SIZE, known before init() too; 1 without torchrun."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0 writes the run folder, logs and checkpoints."""
    return rank() == 0


def my_rows(n: int) -> slice:
    """This rank's contiguous share of n rows (n divisible by the world size): rank r gets r*n/W .. (r+1)*n/W."""
    share = n // world_size()
    return slice(rank() * share, (rank() + 1) * share)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order: [b, ...] on each rank -> [W * b, ...] on every rank.

    This rank's slice is `t` itself, so it keeps its autograd history; the other ranks' rows are constants.
    All ranks must pass the same shape. One process: `t` unchanged.
    """
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[rank()] = t
    return torch.cat(parts)


def max_over_ranks(value: int) -> int:
    """The largest of every rank's `value` (e.g. the longest response, so all ranks pad to one width)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def sum_gradients(params) -> None:
    """grad <- sum over ranks of grad, for these (the trainable) parameters; see the module docstring for why
    a sum. A parameter without a gradient on this rank counts as zeros, so every rank ends up with the same.
    All gradients travel in one flat buffer: one message instead of one per tensor (DDP buckets them alike)."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])  # the adapters' and value head's size: small
    dist.all_reduce(flat)  # ReduceOp.SUM
    for p, summed in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = summed.view_as(p)


def guarded(fn, *args):
    """fn(*args) on this rank, then one collective that tells every rank whether any rank raised.

    If this rank raised, its own exception is re-raised (after the collective, so nobody is left waiting);
    if only another rank did, RankError names the first one that failed and its message. One process: fn(*args).
    """
    if world_size() == 1:
        return fn(*args)
    result, error = None, None
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks before we leave
        error = e
    messages = [None] * world_size()
    dist.all_gather_object(messages, None if error is None else " ".join(f"{type(error).__name__}: {error}".split()))
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, message = failed[0]
        raise RankError(f"stopped because rank {r} failed: {message}")
    return result


def on_main(fn, *args):
    """fn(*args) on rank 0 only (writing the run folder), guarded: if it raises (a full disk), every rank stops
    there too, instead of waiting for rank 0 in the next collective. Other ranks get None."""
    return guarded(fn if is_main() else _nothing, *args)


def _nothing(*args):
    return None


def _comm_device() -> torch.device:
    """NCCL only moves GPU tensors; gloo moves CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
