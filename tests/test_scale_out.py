"""Beyond one device, on the CPU: data-parallel evaluation and calibration in two processes (gloo) started by
`accelerate launch`, layers spread by a device map, and DDP / FSDP training steps against one process.

Each launched run starts real processes (imports included: ~10-20 s of CPU each), so the tests launch as few as
they can and compare against references computed in the test process. Tiny random-weight models throughout.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from loki_helpers import PLAIN

from hf_patch.parallel import launch_command

pytest.importorskip("lm_eval")

import test_eval

STORY, PAIRS, _requests = test_eval.STORY, test_eval.PAIRS, test_eval._requests
tiny_model_dir, tiny_basis, local_tasks = test_eval.tiny_model_dir, test_eval.tiny_basis, test_eval.local_tasks  # fixtures


def launch(args: list[str], num_processes: int = 2, config_file: Path | None = None, timeout: int = 300) -> str:
    """Run `accelerate launch` with `num_processes` CPU processes (one torch thread each); fail with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([*launch_command(num_processes, config_file), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


# ---------------------------------------------------------------- layers on several devices


def test_hf_loki_parallelize_spreads_layers_and_scores_the_same(tiny_model_dir, tiny_basis, tmp_path):
    """lm-eval's `parallelize=True` (accelerate's device_map="auto"): on the CPU, a memory cap puts the first layer
    on the CPU and offloads the second to disk (accelerate's hooks load it where it runs); the patched model scores
    exactly what the same model on one device does. Each layer's basis is put on its weights' device at patch time
    (here the CPU: this machine has no second device to tell apart; on GPUs, `cuda:i` of the layer), an offloaded
    layer's stays on the CPU and follows its keys to the device the hook runs it on."""
    from hf_patch.eval.lm_eval_model import LokiHFLM

    loki = dict(basis=str(tiny_basis), d_frac=0.25, k_frac=0.5, **PLAIN)
    one = LokiHFLM(pretrained=str(tiny_model_dir), dtype="float32", device="cpu", batch_size=2, **loki)
    spread = LokiHFLM(pretrained=str(tiny_model_dir), dtype="float32", batch_size=2, parallelize=True,
                      max_cpu_memory="400KB", offload_folder=str(tmp_path / "offload"), **loki)
    device_map = spread.model.hf_device_map
    assert device_map["model.layers.0"] == "cpu" and device_map["model.layers.1"] == "disk"
    layers = spread.model.model.layers
    assert layers[0].self_attn.hf_patch_loki.components.device.type == "cpu"
    assert layers[1].self_attn.k_proj.weight.device.type == "meta"  # offloaded: loaded by the hook at each call
    expected = torch.tensor([ll for ll, _ in one.loglikelihood(_requests(PAIRS))])
    got = torch.tensor([ll for ll, _ in spread.loglikelihood(_requests(PAIRS))])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - torch.tensor([ll for ll, _ in LokiHFLM(pretrained=str(tiny_model_dir), dtype="float32",
                                                          device="cpu").loglikelihood(_requests(PAIRS))])).abs().max() > 1e-3


# ---------------------------------------------------------------- data-parallel evaluation


def test_hf_loki_scores_do_not_depend_on_the_batch(tiny_model_dir, tiny_basis):
    """HFLM pads a batch on the right and passes no mask; hf-loki passes one, so the paper rule's window is each
    request's own length and a request scores the same whatever it is batched with (which a data-parallel run
    changes). Without the mask, the default rule gave differences of up to 0.09 nats here."""
    from hf_patch.eval.lm_eval_model import LokiHFLM

    args = {"pretrained": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "basis": str(tiny_basis),
            "d_frac": 0.25, "k_frac": 0.5, "sink_tokens": 0, "recent_tokens": 0, "dense_layers": 0}  # k_rule: "paper"
    scores = [torch.tensor([ll for ll, _ in LokiHFLM(**args, batch_size=b).loglikelihood(_requests(PAIRS))])
              for b in (1, 4)]
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=1e-5)


def test_data_parallel_compare_equals_one_process(tiny_model_dir, local_tasks, tmp_path, capfd):
    """`hf-patch compare` with `launch: {num_processes: 2}`: the Loki setting's tasks run under `accelerate launch`
    in two CPU processes, each loading and patching its own replica, lm-eval splitting the requests; every metric
    equals the one-process run's. (Full attention is taken from the one-process run's cache: one launch only. Each
    run calibrates its own basis from the same text: the same basis.)"""
    from hf_patch.app import compare

    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join([test_eval.STORY] * 6))
    calibration = {"dataset": str(text), "num_tokens": 512, "seq_len": 128, "batch_size": 2}
    cfg = {"model": str(tiny_model_dir), "device": "cpu", "batch_size": 2, "calibration": calibration,
           "tasks": {"hfp_bigbench_winowhy": 8, "hfp_books_ppl": 2, "hfp_book_cloze": 2},
           "settings": [{"d_frac": 0.25, "k_frac": 0.5, "sink_tokens": 0, "recent_tokens": 0, "dense_layers": 0}]}
    one = compare.run_compare({**cfg, "output_dir": str(tmp_path / "one")})
    (tmp_path / "two" / "cache").mkdir(parents=True)
    shutil.copy(tmp_path / "one" / "cache" / "full.json", tmp_path / "two" / "cache" / "full.json")
    capfd.readouterr()
    two = compare.run_compare({**cfg, "output_dir": str(tmp_path / "two"), "launch": {"num_processes": 2}})
    log = capfd.readouterr().err
    for task in cfg["tasks"]:  # lm-eval names the process that builds each task's share of the requests
        assert f"Building contexts for {task} on rank 0" in log and f"Building contexts for {task} on rank 1" in log
    label = one["results"][1]["setting"]
    for task in cfg["tasks"]:
        ours, theirs = (run["results"][1]["tasks"][task] for run in (two, one))
        assert ours["n"] == theirs["n"], task
        for metric, value in theirs["results"].items():
            if isinstance(value, float):
                assert ours["results"][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, metric)
    assert one["results"][1]["tasks"]["hfp_books_ppl"]["results"] != one["results"][0]["tasks"]["hfp_books_ppl"][
        "results"], f"{label} should change the perplexity"
    assert not list((tmp_path / "two" / "cache").glob("*.job.json"))  # the launch's job file is removed


# ---------------------------------------------------------------- calibration


def test_two_process_calibration_equals_one(tiny_model_dir, tmp_path):
    """`accelerate launch -m hf_patch calibrate` in two processes deals the windows out and all-reduces the
    float64 sums: the same basis as one process (float64 model, so the keys are the same to the last bits)."""
    import yaml

    from hf_patch import PCABasis, calibrate_pca
    from hf_patch.models.smollm2 import load_model

    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join([STORY, STORY.replace("Anne", "Emma"), STORY.upper()] * 3))
    cal = {"dataset": str(text), "num_tokens": 1600, "seq_len": 64, "batch_size": 3}
    model, tokenizer = load_model(str(tiny_model_dir), dtype="float64")
    one = calibrate_pca(model, tokenizer, progress=False, **cal)
    config = tmp_path / "calibrate.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "dtype": "float64", "device": "auto",
                                      "output": str(tmp_path / "basis"), **cal}))
    launch(["-m", "hf_patch", "calibrate", "--config", str(config)])
    two = PCABasis.load(tmp_path / "basis")
    assert two.metadata["processes"] == 2 and one.metadata["processes"] == 1
    assert two.metadata["tokens"] == one.metadata["tokens"] == 1600 - 1600 % 64
    torch.testing.assert_close(two.eigenvalues, one.eigenvalues, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(two.mean, one.mean, rtol=1e-6, atol=1e-7)
    signs = torch.sign((two.components * one.components).sum(-2, keepdim=True))  # eigenvectors' signs are free
    torch.testing.assert_close(two.components * signs, one.components, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- training: DDP and FSDP


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_transnormer.py"


def _records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in json.loads((out / "transnormer" / "metrics.json").read_text())["records"]}


def _assert_same_steps(got: dict[int, dict], expected: dict[int, dict], steps) -> None:
    """Train and eval losses and learning rates of `steps` agree to float32 rounding of the gradient sums."""
    for step in steps:
        for key in ("train_loss", "eval_loss", "lr"):
            if key in expected[step]:
                assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5), (step, key)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The tiny training config (6 steps of 4 windows, a checkpoint at step 3) run in this process: its config file
    and output directory."""
    from test_transnormer import _load_script, train_setup

    base = tmp_path_factory.mktemp("train")
    config, _ = train_setup(base, steps=6, save_every=3, eval_every=3)
    assert _load_script("train_transnormer").main(["--config", str(config), "--output-dir", str(base / "one")]) == 0
    return config, base / "one"


def test_ddp_resumes_a_one_process_checkpoint_with_the_same_losses(one_process_run, tmp_path):
    """`accelerate launch --config_file configs/accelerate/ddp.yaml` (2 CPU processes, each 2 of the step's 4
    windows) resumes the one-process checkpoint of step 3: steps 4-6 give the one-process losses, learning rates
    and eval loss (DDP averages the gradients; the schedule counts optimizer steps)."""
    config, one = one_process_run
    launch([str(SCRIPT), "--config", str(config), "--output-dir", str(tmp_path / "ddp"),
            "--resume", str(one / "transnormer" / "checkpoint-3")], config_file=CONFIGS / "ddp.yaml")
    run = json.loads((tmp_path / "ddp" / "transnormer" / "metrics.json").read_text())
    assert run["processes"] == 2 and sorted(_records(tmp_path / "ddp")) == list(range(1, 7))
    _assert_same_steps(_records(tmp_path / "ddp"), _records(one), range(1, 7))  # 1-3 carried over from the checkpoint


def test_fsdp_trains_like_one_process_and_resumes_under_another_count(one_process_run, tmp_path):
    """configs/accelerate/fsdp.yaml (FSDP2, sharded checkpoints) in 2 CPU processes gives the one-process losses
    at every step, its final weights (gathered from the shards) equal the one-process ones, and its step-3
    checkpoint resumes in 1 FSDP process to the same end. accelerate applies FSDP on accelerators only, so the
    CPU processes run through tests/cpu_fsdp.py, which switches accelerate's state to FSDP with the launch's plugin."""
    from transformers import AutoModelForCausalLM

    config, one = one_process_run
    shim = str(Path(__file__).with_name("cpu_fsdp.py"))
    launch([shim, str(SCRIPT), "--config", str(config), "--output-dir", str(tmp_path / "fsdp")],
           config_file=CONFIGS / "fsdp.yaml")
    checkpoint = tmp_path / "fsdp" / "transnormer" / "checkpoint-3"
    assert (checkpoint / "training_state" / "pytorch_model_fsdp_0").is_dir()  # sharded, not DDP's model file
    _assert_same_steps(_records(tmp_path / "fsdp"), _records(one), range(1, 7))
    weights = [AutoModelForCausalLM.from_pretrained(d / "transnormer" / "final").state_dict()
               for d in (tmp_path / "fsdp", one)]
    for name, value in weights[1].items():
        torch.testing.assert_close(weights[0][name], value, rtol=1e-4, atol=1e-6, msg=name)

    launch([shim, str(SCRIPT), "--config", str(config), "--output-dir", str(tmp_path / "fsdp1"),
            "--resume", str(checkpoint)], num_processes=1, config_file=CONFIGS / "fsdp.yaml")
    assert json.loads((tmp_path / "fsdp1" / "transnormer" / "metrics.json").read_text())["processes"] == 1
    _assert_same_steps(_records(tmp_path / "fsdp1"), _records(one), range(4, 7))


def test_resume_refuses_another_run(one_process_run, tmp_path):
    from test_transnormer import _load_script

    config, one = one_process_run
    script = _load_script("train_transnormer")
    checkpoint = one / "transnormer" / "checkpoint-3"
    with pytest.raises(ValueError, match=r"another run \(transnormer; differs in \['steps'\]\)"):
        script.main(["--config", str(config), "--steps", "8", "--output-dir", str(tmp_path / "x"),
                     "--resume", str(checkpoint)])
    with pytest.raises(FileNotFoundError, match="not a checkpoint to resume from"):
        script.main(["--config", str(config), "--output-dir", str(tmp_path / "x"),
                     "--resume", str(one / "transnormer" / "final")])
