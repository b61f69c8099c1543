"""Processes started by a launcher (`accelerate launch`, `torchrun`): which one this is, its device, and sums over
all of them.

Through accelerate's `PartialState`, so that code building an `Accelerator` later in the same process (lm-eval's
HFLM, the training script) shares one process group. Without a launcher there is one process and nothing is set up.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from .config import ConfigError, shown, text


def launched() -> bool:
    """Whether a distributed launcher started this process (`torchrun`; `accelerate launch` with several processes
    or a distributed config)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def use_cpu_processes() -> bool:
    """Processes launched on a machine without an accelerator (GPU) talk through gloo on the CPU: accelerate does so
    only when told (`ACCELERATE_USE_CPU`, what `accelerate launch --cpu` sets), so tell it. Returns the flag in
    force."""
    from accelerate.utils import parse_flag_from_env

    if launched() and not torch.accelerator.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return parse_flag_from_env("ACCELERATE_USE_CPU")


def process_state():
    """accelerate's `PartialState` of this process (set up on first use: the process group when launched)."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu_processes())


def process_split() -> tuple[int, int]:
    """(index of this process, number of processes); (0, 1) without a launcher or process group."""
    if not launched() and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    state = process_state()
    return state.process_index, state.num_processes


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed element-wise over every process, in place (returned); unchanged in a single process. The
    tensor must live on this process's device (a GPU with NCCL)."""
    if process_split()[1] > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def end_processes() -> None:
    """Wait for every process, then close the process group (if there is one): a process that exits while the
    others still use the group makes gloo abort them all."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def launch_command(num_processes: int, config_file: str | os.PathLike | None = None) -> list[str]:
    """`accelerate launch` (through this Python) of `num_processes` processes on this machine, on a free port; the
    program and its arguments follow. With an accelerate `config_file` (e.g. configs/accelerate/fsdp.yaml) that
    decides the kind of run; without, several processes are plain data-parallel (`--multi_gpu`, which on a machine
    without GPUs starts CPU processes: `use_cpu_processes`)."""
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--main_process_port", str(_free_port())]
    if config_file is not None:
        return [*cmd, "--config_file", str(config_file)]
    return [*cmd, "--mixed_precision", "no", "--dynamo_backend", "no", *(["--multi_gpu"] if num_processes > 1 else [])]


def _free_port() -> int:
    """A TCP port nothing listens on now, for the processes' rendezvous (runs side by side must not share one)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(device: str) -> str:
    """A device name: "auto" is "cuda" where a GPU is present, else "cpu"; anything else as given, once
    `check_device` found it on this machine."""
    if check_device("device", device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_device(name: str, value: Any) -> str:
    """A device this machine has (the parser of the configs' `device` fields): "auto", "cpu", or an accelerator
    such as "cuda" or "cuda:1" that torch finds here; else a ConfigError, before any model is loaded."""
    value = text(name, value)
    if value == "auto":
        return value
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{name} must be 'auto', 'cpu' or an accelerator torch knows, such as 'cuda' or "
                          f"'cuda:1'; got {shown(value)}") from None
    if device.type in ("cpu", "meta"):
        return value
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ConfigError(f"{name} is {value!r} but torch finds no {device.type} device on this machine: use "
                          "'auto' (a GPU where there is one, else the CPU) or 'cpu'")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ConfigError(f"{name} is {value!r} but this machine has {count()} {device.type} device(s), numbered "
                          "from 0")
    return value
