"""`hf-patch compare` beyond one device: the config key `launch` runs each setting's tasks under `accelerate launch`.

    launch: {num_processes: 2}                                  # data-parallel: one model replica per process
    launch: {num_processes: 8, config_file: my_accelerate.yaml} # any accelerate config (machines, GPU ids, ...)

Each setting's missing tasks run in `accelerate launch ... -m hf_patch.app.launch JOB`, where JOB is a JSON file
holding the checked config and what to run; every process runs `task_runner.run_tasks` (lm-eval splits the requests
between them) and the first one adds the results to the setting's cache file, which `compare` then reads as if it
had run the tasks itself. Without GPUs the processes run on the CPU and talk over gloo.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, Schema, integer, optional, setting, text
from ..data.store import write_json


def _existing_file(name: str, value: Any) -> str:
    """A path to a file that exists."""
    path = text(name, value)
    if not Path(path).is_file():
        raise ConfigError(f"{name}: no file {path}; give an accelerate config file (`accelerate config`) or leave "
                          "it out")
    return path


@dataclass
class Launch(Schema):
    """How `compare` launches each setting's evaluation: `num_processes` processes on this machine (each loads the
    model on its own device), optionally with an accelerate `config_file`."""

    num_processes: int = setting(1, integer(1))
    config_file: str | None = setting(None, optional(_existing_file))


def run_launched(launch: dict[str, Any], job: dict[str, Any]) -> None:
    """Run `task_runner.run_tasks(**job)` in the processes `launch` asks for; the job is written beside its cache file."""
    from ..parallel import launch_command

    settings = Launch.from_dict(launch, "launch")
    path = Path(job["path"]).with_suffix(".job.json")
    write_json(path, job, indent=1)
    cmd = [*launch_command(settings.num_processes, settings.config_file), "-m", __name__, str(path)]
    print(f"{job['label']}: {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, check=False).returncode != 0:
        raise RuntimeError(f"the launched evaluation of {job['label']} failed (its output is above): {' '.join(cmd)}")
    path.unlink()


def main(job_file: str) -> int:
    """One launched process: run the job with lm-eval's log on (as `hf-patch eval` has it: each process names the
    share of each task it builds), then wait for the others."""
    from lm_eval.utils import setup_logging

    from ..parallel import end_processes
    from .task_runner import run_tasks

    setup_logging()
    run_tasks(**json.loads(Path(job_file).read_text()))
    end_processes()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
