"""Run a script under accelerate's FSDP on CPU processes, for the tests: `accelerate launch --config_file
configs/accelerate/fsdp.yaml tests/cpu_fsdp.py SCRIPT ARGS...`.

accelerate (1.16) applies FSDP on accelerators only: on CPU processes it keeps the launch's FSDP plugin unused and
runs DDP. torch's FSDP2 (`fully_shard`) itself runs on the CPU over gloo, so here the state accelerate settles on is
switched to FSDP with that plugin; all else (wrapping, sharded checkpoints, gathering the full weights) is
accelerate's own code path, as on GPUs.
"""
import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _fsdp_on_cpu
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
