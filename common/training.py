"""Training plumbing shared by every stage: distributed setup, seeds, atomic checkpoints, resume.

Nothing here is specific to OARS; it is the part of each training script that is not the idea.

Checkpoint layout (one directory per saved step, written atomically):

    out/sft/checkpoints/step_000120/
        model.safetensors      trainable weights (full model for SFT, LoRA adapters for RL)
        optimizer.safetensors  optimizer state by parameter name, RNG states (see `flatten_optimizer_state`)
        state.json             step, RNG states, data position, anything JSON-serialisable

A step directory is first written as `step_000120.tmp/` and then renamed, so a run killed while saving
leaves the previous checkpoint intact and never a half-written one that `latest_checkpoint` would pick.
Only safetensors and JSON are read back: no pickles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

# ----------------------------------------------------------------------------------------------------
# Distributed setup (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python` runs one process).
# ----------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (nccl on GPUs, gloo on CPU).

    `timeout_minutes` bounds how long a collective waits for the other ranks (torch's default is 10 min).
    Rank failures do not rely on it: the scripts agree on errors each step (`raise_if_any_rank_failed`).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup_distributed() -> None:
    """Leave the process group together: a rank that tears gloo down while another is still talking to it
    can abort at exit ("terminate called without an active exception"), so every rank waits at a barrier
    first. Scripts end through `run_script`, which also skips the interpreter teardown under torchrun."""
    if distributed():
        barrier()
        dist.destroy_process_group()


class RunError(Exception):
    """The run cannot go on for a reason its message names in full (a flag, a file, a missing checkpoint, a
    server that stays down, another rank's failure): `run_script` prints it as ONE line and exits with
    status 2, no traceback (tracebacks are for bugs)."""


def find_checkpoint(name: str, flag: str, real: str) -> str:
    """A model given by folder or hub name -> what `from_pretrained` should load, or RunError in ONE line.

    An existing folder is used as it is. Otherwise a hub name ("org/name") is looked up in the local Hugging
    Face cache (quietly); when it is not there and the machine is offline (HF_HUB_OFFLINE=1, as on the laptops
    the presets are for), or it cannot be a hub name, the error names the flag, the checkpoint and the way out
    at once, before any other work and without the hub client's retries and tracebacks. Online,
    `from_pretrained` downloads it."""
    if Path(name).expanduser().exists():
        return name
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return snapshot_download(name, local_files_only=True)
        except LocalEntryNotFoundError:
            if not offline:
                return name
    raise RunError(f"{flag} {name}: no such folder, and not in the local Hugging Face cache of this offline machine. "
                   f"Pass a folder (e.g. a download of {real}: `huggingface-cli download {real}`, or set HF_HOME), "
                   f"or {flag} mini (the trained laptop preset) or {flag} tiny (random weights, for tests).")


def run_script(main: Callable[[], Any]) -> None:
    """The `if __name__ == "__main__":` of every script that torchrun may launch: `main()`, whose int result
    (if any) is the exit code.

    Under torchrun the process then ends with os._exit after flushing its streams, skipping the
    interpreter's own teardown. `cleanup_distributed` has already left the process group, but gloo's
    worker threads can still be alive while the interpreter tears down, and a rank then aborts
    ("terminate called without an active exception", SIGABRT) after all its work is done and written;
    torchrun reports that as a failed run. A plain `python` run (or an exception) exits the usual way.
    """
    try:
        result = main()
    except RunError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        result = 2
    code = result if isinstance(result, int) and not isinstance(result, bool) else 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def seed_everything(seed: int, rank: int = 0) -> torch.Generator:
    """Seed python/numpy/torch with `seed + rank` and return a CPU generator with the same seed.

    The rank offset matters: with one seed on every GPU all ranks draw identical noise and timesteps,
    so a world of N GPUs trains on N copies of one sample (a known bug in several public trainers).
    """
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


# ----------------------------------------------------------------------------------------------------
# Collectives. EVERY collective of the project goes through the helpers below (tests/test_layout.py fails on
# a call elsewhere). NCCL takes tensors on the GPU only ("No backend type associated with device
# type cpu"); gloo takes CPU tensors. The scripts hold small host tensors (a loss summed as a float, a
# count, a generator state), so each helper moves its tensors to the device the process group serves
# (`comm_device`) and hands results back on the caller's device. The tests check this rule without a GPU
# under a process group registered for cuda only, as NCCL's is, on fake cuda tensors.
# ----------------------------------------------------------------------------------------------------


def distributed() -> bool:
    """True inside an initialised process group of more than zero ranks (torchrun), False for one process."""
    return dist.is_available() and dist.is_initialized()


def comm_device() -> torch.device:
    """The device collectives must use: CPU when the process group serves CPU tensors (gloo), else the
    current accelerator device (NCCL serves "cuda" only). Read from the group's backend map, e.g.
    "cpu:gloo,cuda:gloo", "cuda:nccl" or "cpu:gloo,cuda:nccl"."""
    served = [item.split(":")[0] for item in dist.get_backend_config().split(",")]
    if "cpu" in served:
        return torch.device("cpu")
    index = torch.cuda.current_device() if served[0] == "cuda" and torch.cuda.is_available() else 0
    return torch.device(served[0], index)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks, on `x`'s device (a copy of `x` on one process)."""
    if not distributed():
        return x.clone()
    y = x.detach().to(comm_device(), copy=True)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y.to(x.device)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over ranks (identity on one process)."""
    if not distributed():
        return x
    return all_reduce_sum(x) / dist.get_world_size()


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum the gradients of `params` over ranks, by hand (each rank already divided its loss by the GLOBAL
    sample count). Used where ranks may train on different numbers of samples in a step (RL after the
    group filter), which a DDP wrapper (one all-reduce per backward) cannot handle without deadlocking.
    The gradients live on the compute device already (the GPU under NCCL); they are reduced in place."""
    if distributed():
        device = comm_device()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if p.grad.device == device:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            else:
                p.grad.copy_(all_reduce_sum(p.grad))


def all_gather(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `x` (same shape and dtype on every rank), rank order, on `x`'s device."""
    if not distributed():
        return [x.clone()]
    y = x.detach().to(comm_device())
    out = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(out, y)
    return [o.to(x.device) for o in out]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`src`'s picklable object on every rank (the project's own small JSON-like values only)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if distributed():
        dist.barrier()


class StopOnSignal:
    """Ctrl-C (SIGINT) and SIGTERM ask the run to stop at the next safe point instead of dying mid-step.

    `requested()` is called by every rank at the same point of each step (after the optimizer step); it is True on
    every rank as soon as one rank got a signal (an all-reduce of the flags, so all ranks stop at the same step
    and checkpoint together). The run then saves a checkpoint, prints the resume command and exits with status 130.
    A second Ctrl-C stops at once (the last checkpoint is kept)."""

    def __init__(self) -> None:
        self.flag = False
        self._saved = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._saved[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner's thread): signals stay as they are
                pass

    def _handle(self, signum, frame) -> None:
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print(f"\nstopping at the end of this step (signal {signum}); press Ctrl-C again to stop at once",
              file=sys.stderr, flush=True)

    def requested(self) -> bool:
        return bool(all_reduce_sum(torch.tensor([float(self.flag)]))[0] > 0) if distributed() else self.flag

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


def stopped(stop: StopOnSignal, writer, dist_info: DistInfo) -> int:
    """End a run stopped by a signal (its checkpoint already saved): close its log, leave the process group, print
    the command that resumes it (rank 0) and return exit status 130."""
    stop.restore()
    if writer is not None:
        writer.close()
    cleanup_distributed()
    if dist_info.is_main:
        launcher = "torchrun --nproc_per_node N" if dist_info.world_size > 1 else "python"
        args, skip = [], False
        for a in sys.argv:  # the command as given, without --overwrite and an earlier --resume X
            if skip or a == "--overwrite" or a.startswith("--resume="):
                skip = False
                continue
            skip = a == "--resume"
            if not skip:
                args.append(a)
        print(f"stopped; checkpoint saved. Resume with:\n  {launcher} {' '.join(args)} --resume latest",
              file=sys.stderr, flush=True)
    return 130


# Settings a resumed run may change: where and how it runs (the reward model in-process or served), how often it
# saves, how long it goes on. Any other difference from the run's args.json (another --model, --data, learning
# rate, recipe) would continue one run's weights and optimizer under another's settings: `claim_run_dir` refuses it.
RESUME_MAY_CHANGE = frozenset({"out", "resume", "overwrite", "device", "bf16", "save_every", "keep_last", "micro_batch",
                               "gradient_checkpointing", "steps", "epochs", "max_steps", "stop_after", "threads",
                               "num_workers", "log_every", "sample_every", "reward_url", "reward_model_name",
                               "reward_concurrency", "reward_timeout"})


def claim_run(run_dir: Path, resume: str | None, overwrite: bool, finished: Path | None, dist_info: DistInfo,
              args: dict | None = None) -> None:
    """`claim_run_dir` on rank 0, agreed by every rank (one line and a clean stop on all of them if refused); then
    the run folder exists and holds `args.json` (when `args` is given)."""
    error = None
    if dist_info.is_main:
        try:
            claim_run_dir(run_dir, resume, overwrite, finished, args)
            run_dir.mkdir(parents=True, exist_ok=True)
            if args is not None:
                atomic_write_text(json.dumps(args, indent=1), run_dir / "args.json")
        except RunError as err:
            error = err
        except OSError as err:
            error = RunError(f"--out {run_dir}: cannot write there ({err.strerror or err})")
    raise_if_any_rank_failed(error)


def claim_run_dir(run_dir: Path, resume: str | None, overwrite: bool, finished: Path | None = None,
                  args: dict | None = None) -> None:
    """Refuse, in ONE line and before any work, to start a new run in a folder that holds one (its checkpoints, or
    its finished output `finished`): a new run would replace its results and mix its logs. --resume continues it,
    with the settings it was started with (`args` against its args.json, but for RESUME_MAY_CHANGE); --overwrite
    deletes it first (checkpoints, logs, TensorBoard events, samples, the final output)."""
    # a folder with only args.json and logs holds nothing to resume (the run stopped before its first checkpoint,
    # e.g. on bad input): a new run may reuse it
    holds = list_checkpoints(run_dir / "checkpoints") or (finished is not None and finished.exists())
    if not holds:
        return
    if resume:
        saved = run_dir / "args.json"
        if args is not None and saved.exists():
            before, now = json.loads(saved.read_text()), json.loads(json.dumps(args))  # tuples read back as lists
            changed = [k for k in now if k in before and k not in RESUME_MAY_CHANGE and before[k] != now[k]]
            if changed:
                flags = ", ".join(f"--{k.replace('_', '-')} {before[k]} (now {now[k]})" for k in changed[:3])
                raise RunError(f"--resume {resume}: {run_dir} was started with {flags}; resume it with its settings, "
                               "or pass --overwrite to start a new run there")
        return
    if not overwrite:
        what = finished if finished is not None and finished.exists() else run_dir
        raise RunError(f"{what} already holds a run; pass --resume latest to continue it, or --overwrite to replace it")
    for name in ("checkpoints", "tb", "samples"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("rewards.jsonl", "args.json", "train_log.json", "losses.json"):
        (run_dir / name).unlink(missing_ok=True)
    if finished is not None:
        finished.unlink(missing_ok=True)


class RankFailure(RunError):
    """Another rank failed; raised on every rank with that rank's message, so all stop together."""


def raise_if_any_rank_failed(error: BaseException | None) -> None:
    """Agree on failures: every rank calls this at the same point of a step with its own error (or None).

    If any rank failed, EVERY rank raises: the failed rank its own error, the others `RankFailure` naming
    the first failed rank and its message. Without this, a rank that stops alone (a reward server that
    stays down, bad data) leaves the others blocked in their next collective until the NCCL timeout. On one
    process it re-raises `error`. The last checkpoint, written before this step, is kept.
    """
    if not distributed():
        if error is not None:
            raise error
        return
    mine = "" if error is None else f"{type(error).__name__}: {error}"
    codes = torch.tensor([len(mine.encode())], dtype=torch.long)
    lengths = [int(c) for c in all_gather(codes)]
    if not any(lengths):
        return
    # every rank takes part in the second gather too: the failed ranks' messages as bytes, padded to the longest
    # (tensors, so it works the same on NCCL)
    text = torch.zeros(max(lengths), dtype=torch.uint8)
    text[:len(mine.encode())] = torch.tensor(list(mine.encode()), dtype=torch.uint8)
    messages = [bytes(m[:n].tolist()).decode(errors="replace") for m, n in zip(all_gather(text), lengths)]
    if error is not None:
        raise error
    first = next(r for r, n in enumerate(lengths) if n)
    raise RankFailure(f"rank {first} failed: {messages[first]}")


# ----------------------------------------------------------------------------------------------------
# Atomic file writes
# ----------------------------------------------------------------------------------------------------


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file via a temp file in the same directory + rename (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# RNG state as safetensors + JSON (no pickles)
# ----------------------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Global RNG states of torch (CPU, CUDA), numpy and python as tensors + JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ----------------------------------------------------------------------------------------------------
# Checkpoint directories: save / rotate / find latest / load
# ----------------------------------------------------------------------------------------------------


def save_checkpoint(ckpt_root: str | Path, step: int, model: dict[str, torch.Tensor],
                    optimizer: dict[str, torch.Tensor] | None = None, state: dict | None = None,
                    keep_last: int = 3) -> Path:
    """Write `ckpt_root/step_{step:06d}/` atomically and delete all but the newest `keep_last`.

    `model` and `optimizer` are flat name->tensor dicts; `state` is JSON (step is added).
    """
    root = Path(ckpt_root)
    tmp = root / f"step_{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.items()}, str(tmp / "model.safetensors"))
    if optimizer is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in optimizer.items()},
                  str(tmp / "optimizer.safetensors"))
    return publish_checkpoint(root, step, tmp, state, keep_last)


def publish_checkpoint(root: Path, step: int, tmp: Path, state: dict | None, keep_last: int) -> Path:
    """Write state.json into the complete `tmp` folder, rename it to step_{step:06d}/ (atomic) and delete
    all but the newest `keep_last` checkpoints."""
    final = root / f"step_{step:06d}"
    (tmp / "state.json").write_text(json.dumps({**(state or {}), "step": step}, indent=1))
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoint directories under `ckpt_root`, oldest first (`.tmp` ones are ignored)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir()
            if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
            and (p / "state.json").exists()]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))


def resolve_resume(resume: str | None, ckpt_root: str | Path) -> Path | None:
    """`--resume latest` -> newest checkpoint (None if there is none yet); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(ckpt_root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no state.json). "
                                f"Pass 'latest' or a step_XXXXXX directory under {ckpt_root}.")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Return (model tensors, optimizer tensors, state JSON) of one checkpoint directory."""
    path = Path(path)
    model = load_file(str(path / "model.safetensors"))
    opt_file = path / "optimizer.safetensors"
    optimizer = load_file(str(opt_file)) if opt_file.exists() else {}
    state = json.loads((path / "state.json").read_text())
    return model, optimizer, state


def truncate_jsonl(path: str | Path, last_step: int) -> int:
    """Keep the records of a per-step JSONL log whose "step" is at most `last_step`; returns how many were
    dropped. A resumed run calls it with its start step: the steps after the checkpoint it resumes from are
    trained again, so their records from the killed run must go (each step is logged once)."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    kept = [x for x in lines if json.loads(x)["step"] <= last_step]
    atomic_write_text("".join(x + "\n" for x in kept), path)
    return len(lines) - len(kept)


def summary_writer(folder: str | Path, start_step: int):
    """TensorBoard writer that continues a run: events of steps after `start_step` written by a killed run
    are purged (`purge_step`), so a resumed run shows each step once."""
    from torch.utils.tensorboard import SummaryWriter

    if start_step:
        # TensorBoard reads a folder's event files in name order, and a name starts with the second the file was
        # created (events.out.tfevents.<seconds>.<host>.<pid>...): a writer created in the same second as the
        # killed run's file may be read first, and the purge then drops the wrong steps. Start a second later.
        seconds = [p.name.split(".")[3] for p in Path(folder).glob("events.out.tfevents.*")]
        newest = max((int(t) for t in seconds if t.isdigit()), default=0)
        while time.time() < newest + 1:
            time.sleep(0.05)
    return SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)


class NonFiniteGuard:
    """Skip steps whose loss is NaN/Inf, count them, and stop after `max_skips` of them.

    One bad batch should not end a multi-day run, but a run that keeps producing NaN is broken and
    must stop with a clear message instead of silently training nothing.
    """

    def __init__(self, max_skips: int = 10):
        self.max_skips = max_skips
        self.skipped = 0

    def ok(self, loss: torch.Tensor) -> bool:
        finite = bool(torch.isfinite(all_reduce_mean(loss.detach().float())).item())
        if not finite:
            self.skipped += 1
            if self.skipped > self.max_skips:
                raise FloatingPointError(
                    f"loss was NaN/Inf in {self.skipped} steps (limit --max-nonfinite {self.max_skips}); "
                    "lower the learning rate or check the data. The last checkpoint is intact.")
        return finite


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Shuffled indices per (seed, epoch), split across ranks, that can start mid-epoch.

    Every rank draws the same permutation (seeded by `seed + epoch`, not by the rank) and takes every
    `world_size`-th index, so ranks see disjoint data. `set_epoch(epoch, start)` skips the first
    `start` indices of this rank's share: that is how a resumed run continues at the exact data
    position where it stopped, without loading the skipped images.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.n, self.rank, self.world_size, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.per_rank = math.ceil(n / world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        order = (order * math.ceil(self.per_rank * self.world_size / self.n))[: self.per_rank * self.world_size]
        return iter(order[self.rank::self.world_size][self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


def infinite_batches(dataset: torch.utils.data.Dataset, batch_size: int, dist_info: DistInfo, seed: int,
                     start_step: int = 0, num_workers: int = 0, collate_fn=None):
    """Yield (epoch, batch) forever, starting at the batch that `start_step` steps have consumed.

    Epoch e uses permutation (seed, e) and the dataset's own per-epoch randomness (`set_epoch`, e.g.
    the crops and degradations of `data.HRFolderDataset`).
    """
    sampler = ResumableSampler(len(dataset), dist_info.rank, dist_info.world_size, seed)
    if sampler.per_rank < batch_size:
        raise ValueError(f"the dataset has {len(dataset)} items: too few for a batch of {batch_size} on each of "
                         f"{dist_info.world_size} process(es); add data or lower --batch-size")
    steps_per_epoch = max(1, sampler.per_rank // batch_size)
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch, offset * batch_size)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                             num_workers=num_workers, collate_fn=collate_fn)
        for batch in loader:
            yield epoch, batch
        epoch, offset = epoch + 1, 0


class ReusePool:
    """Use each encoded training pair `reuse` times on average, so the frozen encoders (and the on-the-fly
    degradation) run once every `reuse` steps instead of every step.

    At steps 0, R, 2R, ... (R = reuse) one fresh batch from `fetch()` is turned into a list of items by
    `encode` and joins a first-in-first-out pool of the last R batches; every step then trains on as many
    items as a batch holds, drawn without replacement from the pool with `generator`. R = 1 is the plain
    loop: each step its own fresh batch, in order, and no draw. The trade: fewer fresh pairs per step, but
    on a CPU the text encoder + VAE cost more than the transformer's forward and backward, so R = 4 gives
    about twice the optimizer steps per hour (measured on the mini preset; README: Mini presets).

    Batch j of `fetch` is the one of step R*j, so a resumed run rebuilds the exact pool it had: start the
    loader at `first_batch(step)` and call `prefill(step)` before the first step.
    """

    def __init__(self, reuse: int, fetch: Callable[[], Any], encode: Callable[[Any], list],
                 generator: torch.Generator):
        if reuse < 1:
            raise ValueError(f"--reuse {reuse}: must be >= 1 (1 = every step its own fresh batch)")
        self.reuse, self.fetch, self.encode, self.generator = reuse, fetch, encode, generator
        self.pool: list[list] = []
        self.last_raw: Any = None  # the newest fetched batch (e.g. for sample pictures)

    def first_batch(self, step: int) -> int:
        """Index of the oldest fetched batch still in the pool when `step` starts (where the loader resumes)."""
        if self.reuse == 1 or step == 0:
            return step
        return max(0, (step - 1) // self.reuse - self.reuse + 1)

    def prefill(self, step: int) -> None:
        """Re-encode the batches the pool held before `step` (no-op at step 0 and for reuse 1)."""
        if step > 0 and self.reuse > 1:
            for _ in range((step - 1) // self.reuse - self.first_batch(step) + 1):
                self._add()

    def _add(self) -> None:
        self.last_raw = self.fetch()
        self.pool = [*self.pool, self.encode(self.last_raw)][-self.reuse:]

    def __call__(self, step: int) -> list:
        """The items to train on at `step`."""
        if step % self.reuse == 0:
            self._add()
        if self.reuse == 1:
            return self.pool[-1]
        items = [item for batch in self.pool for item in batch]
        order = torch.randperm(len(items), generator=self.generator)[:len(self.pool[-1])]
        return [items[i] for i in order.tolist()]


def check_ranks_in_sync(params: list[torch.Tensor], atol: float = 0.0) -> float:
    """Raise if the trainable parameters differ between ranks (cheap checksum); returns the checksum.

    DDP keeps replicas identical by construction; this catches what breaks that (a rank skipping a step
    alone, a parameter outside DDP, different initial weights from an unseeded build).
    """
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).cpu()
    if distributed():
        values = torch.cat(all_gather(checksum))
        if (values - values[0]).abs().max() > atol:
            raise RuntimeError(f"ranks diverged: parameter checksums {values.tolist()}")
    return float(checksum)


# ----------------------------------------------------------------------------------------------------
# Full state dicts that work the same for plain, DDP and FSDP2-sharded models
# ----------------------------------------------------------------------------------------------------


def gather_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                      keep: Callable[[str], bool] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict, optimizer state dict keyed by parameter NAME) as full CPU tensors.

    Collective under FSDP2 (every rank must call it; rank 0 gets the tensors). Works unchanged on a
    plain module, which is why every script checkpoints through it. `keep` selects the weights by name;
    on a plain module only those are copied to the host (an RL checkpoint copies its LoRA adapters, a few
    hundred MB, not the 41 GB base they sit on).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if any(hasattr(p, "device_mesh") for p in model.parameters()):  # FSDP2 DTensors: gather, then select
        model_sd = {k: v for k, v in get_model_state_dict(model, options=opts).items() if keep is None or keep(k)}
    else:  # references to the live tensors: select first, then copy only those
        model_sd = {k: v.detach().cpu() for k, v in model.state_dict().items() if keep is None or keep(k)}
    seen: set[int] = set()
    for k, v in model_sd.items():  # tied weights share memory, which safetensors refuses: copy them
        if v.data_ptr() in seen:
            model_sd[k] = v.clone()
        seen.add(v.data_ptr())
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else {}
    return model_sd, optim_sd


def restore_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict,
                       optim_sd: dict, sharded: bool = False) -> None:
    """Load full state dicts back (`sharded`: rank 0 holds them and broadcasts; other ranks pass {}).

    The model state may be partial (e.g. only the LoRA adapters): missing keys keep their values.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, model_sd, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=sharded, strict=False))
    if optimizer is not None:
        # strict=False: parameters that never received a gradient have no Adam state
        set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=sharded, strict=False))


def flatten_optimizer_state(optim_sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Name-keyed optimizer state dict -> ({"optim.<param name>.<key>": tensor}, JSON part)."""
    tensors, scalars = {}, {}
    for name, pstate in optim_sd.get("state", {}).items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{name}.{key}"] = value
            else:
                scalars[f"{name}.{key}"] = value
    return tensors, {"param_groups": optim_sd.get("param_groups", []), "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of `flatten_optimizer_state` (parameter names contain dots; keys such as exp_avg do not)."""
    state: dict[str, dict] = {}
    for flat, value in tensors.items():
        if flat.startswith("optim."):
            name, key = flat[len("optim."):].rsplit(".", 1)
            state.setdefault(name, {})[key] = value
    for flat, value in meta["scalars"].items():
        name, key = flat.rsplit(".", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


@contextmanager
def parameters_on_meta(enabled: bool = True):
    """Build modules with their PARAMETERS on the meta device: shapes only, no memory, no init cost.

    Buffers and plain tensor attributes (RoPE tables) are computed as usual. Each parameter is moved to
    meta as it is registered, so at most one parameter is ever materialised. This is how the FSDP2 ranks
    other than 0 build a model whose shards they receive from rank 0 (`shard_from_rank0`).
    """
    if not enabled:
        yield
        return
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def shard_from_rank0(model: torch.nn.Module, blocks: list[torch.nn.Module], dist_info: DistInfo,
                     bf16: bool = False) -> None:
    """FSDP2 with ONE full copy of the weights per node instead of one per rank.

    Rank 0 built `model` with its weights; the other ranks built it under `parameters_on_meta`. Every rank
    shards the blocks and the root (`fully_shard_blocks`), allocates its own shards (`to_empty`, keeping
    the buffers), and rank 0 broadcasts its full weights, of which each rank keeps its shard. The result
    equals loading the full model on every rank and sharding it, bit for bit.
    """
    full = model.state_dict() if dist_info.is_main else {}  # rank 0's full weights, alive until broadcast
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    fully_shard_blocks(model, blocks, dist_info.device, dist_info.world_size, bf16)
    model.to_empty(device=dist_info.device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    restore_full_state(model, None, full, {}, sharded=True)


def fully_shard_blocks(model: torch.nn.Module, blocks: list[torch.nn.Module], device: torch.device,
                       world_size: int, bf16: bool = False) -> None:
    """FSDP2: `fully_shard` every block, then the root. Parameters become DTensors sharded over the
    ranks; a block's full weights exist only during its forward/backward. bf16: compute in bfloat16,
    reduce gradients in float32, keep float32 master weights (and so the optimizer state) sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


@contextmanager
def root_unsharded(model: torch.nn.Module, sharded: bool):
    """FSDP2: keep the root's own parameters (embeddings, the vision patch embedding and merger, lm_head) gathered
    for calls that use them outside the root's forward. transformers' `generate` encodes the images
    (`get_image_features`, hence the patch-embedding convolution) before its first forward, where the root's
    hooks would gather them: a sharded weight there fails ("got mixed torch.Tensor and DTensor"). The blocks,
    sharded on their own, gather in their own forwards. Call on every rank (an all-gather)."""
    if not sharded:
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def save_training_checkpoint(ckpt_root: str | Path, step: int, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer, dist_info: DistInfo,
                             generator: torch.Generator | None = None,
                             scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                             keep: Callable[[str], bool] | None = None, keep_last: int = 3, sharded: bool = False,
                             **extra: Any) -> None:
    """Everything a resumed run needs: weights (those whose name passes `keep`, default all),
    optimizer (by parameter name), scheduler, global RNG and every rank's own noise generator.

    Call on ALL ranks; rank 0 writes the JSON state. `sharded` (FSDP2): every rank writes its OWN shards of
    the weights and the optimizer state (`model.rank{r}.safetensors`, `optimizer.rank{r}.safetensors`),
    in parallel and without a gather: a full-state checkpoint of the 20B SFT (fp32 weights + AdamW,
    ~245 GB) would be gathered to rank 0's host while the other ranks wait. Such a checkpoint resumes on
    the same number of ranks. Without `sharded`, rank 0 gathers and writes one file per kind.
    """
    states = all_gather(generator.get_state()) if generator is not None else []  # every rank's noise stream
    rng_tensors, rng_meta = rng_state()
    gens = {f"generator.{r}": g for r, g in enumerate(states)}
    root = Path(ckpt_root)
    if sharded:
        tmp = root / f"step_{step:06d}.tmp"
        if dist_info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        weights, optim_tensors, optim_meta = local_shards(model, optimizer, keep)
        rank = dist_info.rank
        save_file(weights, str(tmp / f"model.rank{rank}.safetensors"))
        save_file(optim_tensors, str(tmp / f"optimizer.rank{rank}.safetensors"))
        if dist_info.is_main:
            save_file(rng_tensors | gens, str(tmp / "rng.safetensors"))
        barrier()
        if dist_info.is_main:
            meta = {"optimizer": optim_meta, "rng": rng_meta, "shards": dist_info.world_size, **extra}
            if scheduler is not None:
                meta["scheduler"] = scheduler.state_dict()
            publish_checkpoint(root, step, tmp, meta, keep_last)
        barrier()
        return
    model_sd, optim_sd = gather_full_state(model, optimizer, keep)
    if dist_info.is_main:
        opt_tensors, opt_meta = flatten_optimizer_state(optim_sd)
        meta = {"optimizer": opt_meta, "rng": rng_meta, **extra}
        if scheduler is not None:
            meta["scheduler"] = scheduler.state_dict()
        save_checkpoint(ckpt_root, step, model_sd, {**opt_tensors, **rng_tensors, **gens}, meta, keep_last=keep_last)
    barrier()


def local_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 keep: Callable[[str], bool] | None = None) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """This rank's pieces of an FSDP2 model and its optimizer, as plain CPU tensors (no communication):
    (weights by name, "optim.<name>.<key>" tensors, the optimizer's JSON part)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=False)

    def local(t: torch.Tensor) -> torch.Tensor:
        return (t.to_local() if hasattr(t, "to_local") else t).detach().contiguous().cpu()

    weights = {k: local(v) for k, v in get_model_state_dict(model, options=opts).items() if keep is None or keep(k)}
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else {}
    tensors, meta = flatten_optimizer_state(
        {"state": {n: {k: local(v) if torch.is_tensor(v) else v for k, v in st.items()}
                   for n, st in optim_sd.get("state", {}).items()},
         "param_groups": optim_sd.get("param_groups", [])})
    return weights, tensors, meta


def restore_local_shards(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                         rank: int, state: dict) -> None:
    """Inverse of `local_shards` for this rank: the shards go back into the model's DTensors in place, the
    optimizer state is rebuilt as DTensors laid out like the parameters they belong to."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    weights = load_file(str(path / f"model.rank{rank}.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in weights:
                target = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                target.copy_(weights[name])
    if optimizer is None:
        return
    tensors = load_file(str(path / f"optimizer.rank{rank}.safetensors"))
    optim_sd = unflatten_optimizer_state({k: v for k, v in tensors.items() if k.startswith("optim.")},
                                         state["optimizer"])
    for name, st in optim_sd["state"].items():
        p = params[name]
        for key, value in st.items():
            if torch.is_tensor(value) and hasattr(p, "device_mesh") and value.shape == p.to_local().shape:
                st[key] = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements, run_check=False,
                                             shape=p.shape, stride=p.stride())
            elif torch.is_tensor(value):
                st[key] = value.to(p.device) if value.ndim else value
    # strict=False: parameters that never received a gradient have no AdamW state (as in restore_full_state)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=False, strict=False))


def restore_training_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                dist_info: DistInfo, generator: torch.Generator | None = None,
                                scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                                sharded: bool = False) -> dict:
    """Inverse of `save_training_checkpoint`; returns the JSON state (step, extras).

    A checkpoint of per-rank shards is read back by each rank (same number of ranks required). A full-state
    checkpoint under `sharded` (FSDP2): only rank 0 reads the tensors and broadcasts them into the shards.
    A run resumed on a different number of ranks reuses rank 0's noise stream for the new ranks.
    """
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    shards = state.get("shards")
    if shards is not None:
        if shards != dist_info.world_size or not sharded:
            raise RunError(f"--resume {path}: this checkpoint holds the shards of {shards} FSDP processes; "
                             f"resume it with torchrun --nproc_per_node {shards} and --fsdp")
        restore_local_shards(path, model, optimizer, dist_info.rank, state)
        tensors = load_file(str(path / "rng.safetensors"))  # global RNG and every rank's noise generator
    else:
        read = dist_info.is_main or not sharded
        weights, tensors, _ = load_checkpoint(path) if read else ({}, {}, None)
        optim_sd = unflatten_optimizer_state(tensors, state["optimizer"]) if read else {}
        restore_full_state(model, optimizer, weights, optim_sd, sharded)
        if not read:  # the generator states come from rank 0
            tensors = broadcast_object({k: v for k, v in tensors.items() if k.startswith("generator.")})
        elif sharded:
            broadcast_object({k: v for k, v in tensors.items() if k.startswith("generator.")})
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if dist_info.is_main or not sharded or shards is not None:
        set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")}, state["rng"])
    if generator is not None:
        generator.set_state(tensors.get(f"generator.{dist_info.rank}", tensors["generator.0"]))
    return state


# ----------------------------------------------------------------------------------------------------
# Command lines from argument dataclasses (CleanRL style: one field = one flag, its docstring = --help)
# ----------------------------------------------------------------------------------------------------


def field_docs(cls) -> dict[str, str]:
    """{field: the docstring written under it} of a dataclass, its base classes' fields included (a subclass's
    own docstring wins)."""
    import ast
    import inspect

    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def add_dataclass_args(parser, cls, defaults: dict | None = None, exclude: Sequence[str] = ()) -> None:
    """One --flag per dataclass field (underscores -> dashes), its docstring as help, its default shown.

    Fields without a default are required; a list field takes several values (`--x a b`, replacing the
    default); a tuple field is repeatable and accumulates (`--x a --x b c`). Fields documented as
    "(filled at run time)" and the names in `exclude` are skipped; `defaults` overrides field defaults. A
    field whose default is itself an argument dataclass (e.g. the options of one objective) becomes an
    argument group of its own flags, titled by that class's docstring.
    """
    import argparse
    from dataclasses import MISSING, fields, is_dataclass

    docs, defaults = field_docs(cls), defaults or {}
    for f in fields(cls):
        help_text = docs.get(f.name, "").replace("%", "%%")
        if help_text.startswith("(filled at run time)") or f.name in exclude:
            continue
        default = defaults.get(f.name, f.default_factory() if f.default_factory is not MISSING else f.default)
        if is_dataclass(default):  # a group of options that belongs to one part (its own module defines it)
            title = (type(default).__doc__ or f.name).strip().split("\n")[0]
            add_dataclass_args(parser.add_argument_group(title), type(default), defaults, exclude)
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        conv = int if kind.startswith("int") else float if kind.startswith("float") else str
        if default is MISSING or help_text.startswith("(required)"):  # a docstring may mark a defaulted field
            parser.add_argument(flag, type=conv, required=True, default=argparse.SUPPRESS,
                                help=help_text.removeprefix("(required)").strip() + " (required)")
        elif kind.startswith("bool"):  # "bool" or "bool | None" (None = decided at run time, the help says how)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(default, tuple):
            parser.add_argument(flag, action="extend", nargs="+", default=list(default), help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="*", default=list(default), help=help_text)
        else:
            parser.add_argument(flag, type=conv, default=default, help=help_text)


def dataclass_from_namespace(cls, values: dict):
    """Build `cls` from parsed flag values; argument-dataclass fields are built from their own flags."""
    from dataclasses import MISSING, fields, is_dataclass

    kwargs = {}
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            kwargs[f.name] = dataclass_from_namespace(type(default), values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


# Old spellings of flags, kept working for a release: one vocabulary across the scripts (README "Flags").
DEPRECATED_FLAGS = {
    "--output": "--out", "--out-folder": "--out", "--hr": "--hr-dir", "--hr-folder": "--hr-dir",
    "--server": "--reward-url", "--server-model": "--reward-model-name", "--views": "--reward-views",
    "--fidelity-metric": "--fidelity", "--refreward": "--refreward-model", "--sr": "--sr-dir",
}


def renamed_flags(argv: Sequence[str], known: set[str], renames: dict[str, str] | None = None) -> list[str]:
    """`argv` with deprecated flag spellings replaced by the current ones (a line on stderr for each), where the
    current one is a flag of this command (`known`). `--flag=value` forms are handled too."""
    renames = DEPRECATED_FLAGS if renames is None else renames
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        new = renames.get(flag)
        if new is not None and new in known and flag not in known:
            print(f"warning: {flag} is deprecated and will be removed; use {new}", file=sys.stderr)
            arg = new + eq + value
        out.append(arg)
    return out


def parse_dataclass_args(cls, argv: list[str] | None = None, description: str = "", defaults: dict | None = None,
                         exclude: Sequence[str] = ()):
    """Parse a command line into an instance of the argument dataclass `cls` -> (args, parser). `--help` shows
    every option with its help text and default; deprecated spellings still work (`DEPRECATED_FLAGS`)."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_args(parser, cls, defaults, exclude)
    argv = sys.argv[1:] if argv is None else list(argv)
    known = {o for action in parser._actions for o in action.option_strings}
    return dataclass_from_namespace(cls, vars(parser.parse_args(renamed_flags(argv, known)))), parser
