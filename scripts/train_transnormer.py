#!/usr/bin/env python
"""Train a TransNormer (or the same-size Llama baseline) on the local book corpus with `accelerate`.

    python scripts/train_transnormer.py --config configs/transnormer/tiny_cpu.yaml            # TransNormer
    python scripts/train_transnormer.py --config configs/transnormer/tiny_cpu.yaml --model llama
    accelerate launch scripts/train_transnormer.py --config configs/transnormer/100m_gpu.yaml  # one or many GPUs
    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 8 scripts/train_transnormer.py ...
    python scripts/train_transnormer.py --config ... --resume OUT/transnormer/checkpoint-100  # any process count
    python scripts/train_transnormer.py --config ... --prepare-tokens .gpu/books              # token ids only

`batch_size` is the number of windows per optimizer step over all processes (split evenly between them), so a
config trains the same model on 1 or N devices (DDP or FSDP, configs/accelerate/), up to float rounding, and a
checkpoint (`save_every`: model files plus accelerate's training state) resumes under another process count.

Both models see the same tokenizer (SmolLM2), token windows in the same order, optimizer, schedule and loss code
(`fused_loss: true`, the default: `hf_patch.transnormer.CausalLMWithFusedLoss`, the fused linear + cross entropy on
the last hidden state, no logits; `false`: the models' own `forward(labels=...)`). Token ids
come from `data.tokens_dir` ({train,eval}.npy, uint16; made by --prepare-tokens) when it exists, else from the
`books:calibration` / `books:evaluation` texts. Writes under `output_dir/<model>/`: metrics.json, metrics.csv,
checkpoints (`save_pretrained`), and `output_dir/loss.png` with every model trained there so far.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from hf_patch.config import load_config, override
from hf_patch.parallel import use_cpu_processes
from hf_patch.transnormer import CausalLMWithFusedLoss

KEYS = {
    "model", "tokenizer", "data", "seq_len", "batch_size", "steps", "lr", "warmup_steps",
    "weight_decay", "betas", "grad_clip", "eval_every", "eval_batches", "save_every", "mixed_precision",
    "output_dir", "seed", "gradient_checkpointing", "fused_loss",
}
MODELS = ("transnormer", "llama")
# what a resumed run must share with the run that saved the checkpoint: the model and the optimisation (paths,
# precision, evaluation and saving may change)
RESUME_KEYS = ("model", "seq_len", "batch_size", "steps", "lr", "warmup_steps", "weight_decay", "betas", "grad_clip",
               "seed", "fused_loss")
TRAINING_STATE, TRAINER_STATE = "training_state", "trainer_state.json"


# ---------------------------------------------------------------- data


def _texts(split: str):
    """Texts of the book corpus split ('calibration' or 'evaluation'); plain jsonl when `datasets` is absent."""
    try:
        from hf_patch.data.text import iter_texts

        yield from iter_texts(f"books:{split}")
    except ImportError:
        from hf_patch.data.paths import cache_root

        path = cache_root() / "data" / "books" / f"{split}.jsonl"
        with open(path) as f:
            for line in f:
                if text := json.loads(line)["text"]:
                    yield text


def tokenize_split(tokenizer, split: str, max_tokens: int) -> np.ndarray:
    """Concatenate the split's texts, EOS-separated, as uint16 ids (at most `max_tokens`)."""
    if len(tokenizer) > np.iinfo(np.uint16).max:
        raise ValueError(f"vocab of {len(tokenizer)} tokens does not fit uint16")
    ids: list[int] = []
    for text in _texts(split):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        if len(ids) >= max_tokens:
            break
    return np.asarray(ids[:max_tokens], dtype=np.uint16)


def load_tokens(cfg: dict, tokenizer) -> dict[str, np.ndarray]:
    """{'train', 'eval'} uint16 id arrays, from `data.tokens_dir` when present, else tokenized now."""
    data = cfg["data"]
    folder = Path(data.get("tokens_dir", "")) if data.get("tokens_dir") else None
    if folder is not None and (folder / "train.npy").is_file():
        return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("train", "eval")}
    return {
        "train": tokenize_split(tokenizer, data.get("train_split", "calibration"), int(data["train_tokens"])),
        "eval": tokenize_split(tokenizer, data.get("eval_split", "evaluation"), int(data["eval_tokens"])),
    }


def windows(tokens: np.ndarray, seq_len: int) -> torch.Tensor:
    """Non-overlapping [N, seq_len] int64 windows of `tokens` (the tail is dropped)."""
    n = len(tokens) // seq_len
    if n == 0:
        raise ValueError(f"{len(tokens)} tokens are fewer than one window of {seq_len}")
    return torch.from_numpy(np.asarray(tokens[: n * seq_len], dtype=np.int64)).view(n, seq_len)


def batch_order(num_windows: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """[steps, batch_size] window indices: epochs of seeded permutations, the same for every model."""
    g = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    perms = [torch.randperm(num_windows, generator=g) for _ in range(math.ceil(needed / num_windows))]
    return torch.cat(perms)[:needed].view(steps, batch_size)


# ---------------------------------------------------------------- models


def build_model(kind: str, cfg: dict, tokenizer):
    """A fresh TransNormer from `cfg['model']`, or the Llama of the same size."""
    from transformers import LlamaForCausalLM

    from hf_patch.transnormer import TransNormerConfig, TransNormerForCausalLM
    from hf_patch.transnormer.baseline import matching_llama_config

    tn_config = TransNormerConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **cfg["model"],
    )
    if kind == "transnormer":
        return TransNormerForCausalLM(tn_config)
    return LlamaForCausalLM(matching_llama_config(tn_config, max_position_embeddings=cfg["seq_len"]))


# ---------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model, accelerator, eval_windows: torch.Tensor, batch_size: int, batches: int) -> float:
    """Mean token loss over the first `batches` x `batch_size` eval windows, split evenly over the processes (the
    same windows whatever their number; every process runs as many forwards, as FSDP needs)."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    world = accelerator.num_processes
    chunk = eval_windows[: min(len(eval_windows), batches * batch_size) // world * world]
    for ids in chunk[accelerator.process_index :: world].split(batch_size // world):
        ids = ids.to(accelerator.device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        total += loss.float() * ids.numel()
        count += ids.numel()
    model.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return (total / count).item()


def make_accelerator(cfg: dict):
    """accelerate's `Accelerator` for this run (DDP, FSDP, ... as `accelerate launch` set it up), checked: an FSDP
    launch that accelerate does not apply (it runs FSDP on accelerators only) is refused, not silently DDP."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    use_cpu_processes()  # launched without GPUs: the processes talk over gloo on the CPU
    # the schedule counts optimizer steps: accelerate would otherwise step it once per process at every step
    accelerator = Accelerator(mixed_precision=cfg.get("mixed_precision", "no"), step_scheduler_with_optimizer=False)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" \
            and accelerator.distributed_type != DistributedType.FSDP:
        raise RuntimeError(f"the launch asked for FSDP but accelerate runs {accelerator.distributed_type} here "
                           "(it applies FSDP on GPUs and other accelerators only): launch without the FSDP config")
    world = accelerator.num_processes
    if cfg["batch_size"] % world:
        raise ValueError(f"batch_size {cfg['batch_size']} (windows per step over all processes) must be a "
                         f"multiple of the number of processes ({world})")
    return accelerator


def train(cfg: dict, kind: str, resume: Path | None = None) -> Path:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    accelerator = make_accelerator(cfg)
    torch.manual_seed(cfg["seed"])
    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer(cfg["tokenizer"]))
    tokens = load_tokens(cfg, tokenizer)
    train_windows, eval_windows = windows(tokens["train"], cfg["seq_len"]), windows(tokens["eval"], cfg["seq_len"])
    world, per_device = accelerator.num_processes, cfg["batch_size"] // accelerator.num_processes
    order = batch_order(len(train_windows), cfg["batch_size"], cfg["steps"], cfg["seed"])

    lm = build_model(kind, cfg, tokenizer)
    if cfg.get("gradient_checkpointing"):
        lm.gradient_checkpointing_enable()
    params = sum(p.numel() for p in lm.parameters())
    decay = [p for n, p in lm.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in lm.named_parameters() if p.dim() < 2]
    # What `accelerate` wraps (autocast, DDP): the loss-only wrapper, or the model itself.
    model = CausalLMWithFusedLoss(lm) if cfg.get("fused_loss", True) else lm
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"], betas=tuple(cfg["betas"]),
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg["warmup_steps"], cfg["steps"])
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    out = Path(cfg["output_dir"]) / kind
    out.mkdir(parents=True, exist_ok=True)
    records, first = load_checkpoint(accelerator, resume, cfg, kind) if resume else ([], 1)
    accelerator.print(
        f"{kind}: {params / 1e6:.1f}M parameters, {len(train_windows)} train windows of {cfg['seq_len']}, "
        f"{world} process(es) x batch {per_device}, {cfg['steps']} steps"
        + (f", resumed from {resume} at step {first}" if resume else "")
    )
    start = time.perf_counter() - (records[-1]["elapsed_s"] if records else 0.0)
    bar = tqdm(range(first, cfg["steps"] + 1), disable=not accelerator.is_main_process, desc=kind)
    for step in bar:
        rows = order[step - 1].view(world, per_device)[accelerator.process_index]
        ids = train_windows[rows].to(accelerator.device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        accelerator.backward(loss)
        if cfg["grad_clip"]:
            accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step, "train_loss": accelerator.reduce(loss.detach().float(), "mean").item(),
                  "lr": scheduler.get_last_lr()[0], "tokens": step * per_device * world * cfg["seq_len"]}
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            record["eval_loss"] = evaluate(model, accelerator, eval_windows, cfg["batch_size"], cfg["eval_batches"])
        record["elapsed_s"] = time.perf_counter() - start
        records.append(record)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", **({"eval": f"{record['eval_loss']:.3f}"}
                                                                 if "eval_loss" in record else {}))
        if cfg.get("save_every") and step % cfg["save_every"] == 0 and step != cfg["steps"]:
            save_checkpoint(accelerator, model, tokenizer, out / f"checkpoint-{step}",
                            {"model": kind, "step": step, "processes": world, "config": cfg, "records": records})
    save_checkpoint(accelerator, model, tokenizer, out / "final")
    if accelerator.is_main_process:
        write_metrics(out, records, {"model": kind, "parameters": params, "config": cfg, "processes": world})
        plot_runs(Path(cfg["output_dir"]))
    accelerator.end_training()
    return out


def save_checkpoint(accelerator, model, tokenizer, path: Path, trainer_state: dict | None = None) -> None:
    """The model as `save_pretrained` writes it (full weights, gathered from FSDP shards) and the tokenizer; with
    `trainer_state` also accelerate's training state (`save_state`: model, optimizer, scheduler, RNG; sharded
    under FSDP) and the trainer's step and records, which `--resume` reads. Every process must call it."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    lm = unwrapped
    if isinstance(unwrapped, CausalLMWithFusedLoss):  # save the model, not the loss wrapper
        lm = unwrapped.lm
        state_dict = {k.removeprefix("lm."): v for k, v in (state_dict or {}).items()}
    lm.save_pretrained(path, state_dict=state_dict, is_main_process=accelerator.is_main_process,
                       save_function=accelerator.save)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(path)
    if trainer_state is not None:
        accelerator.save_state(path / TRAINING_STATE)
        if accelerator.is_main_process:
            (path / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, path: Path, cfg: dict, kind: str) -> tuple[list[dict], int]:
    """Restore accelerate's training state from a `save_checkpoint` directory (written under any number of
    processes); return the records so far and the next step. The run must be the one that wrote it."""
    trainer_file = Path(path) / TRAINER_STATE
    if not trainer_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint to resume from (no {TRAINER_STATE}): give a "
                                "checkpoint-N directory written with save_every")
    state = json.loads(trainer_file.read_text())
    changed = [k for k in RESUME_KEYS if state["config"].get(k) != cfg.get(k)]
    if state["model"] != kind or changed:
        raise ValueError(f"{path} was written by another run ({state['model']}; differs in "
                         f"{changed or ['model']}): resume with the config and --model it was trained with")
    accelerator.load_state(Path(path) / TRAINING_STATE)
    return state["records"], state["step"] + 1


def write_metrics(out: Path, records: list[dict], meta: dict) -> None:
    (out / "metrics.json").write_text(json.dumps({**meta, "records": records}, indent=1))
    fields = ["step", "tokens", "lr", "train_loss", "eval_loss", "elapsed_s"]
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in fields} for r in records)


def plot_runs(output_dir: Path) -> Path | None:
    """Train (thin) and eval (markers) loss of every model trained under `output_dir`, in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {kind: json.loads((output_dir / kind / "metrics.json").read_text())
            for kind in MODELS if (output_dir / kind / "metrics.json").is_file()}
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (kind, run), color in zip(runs.items(), ("tab:blue", "tab:orange")):
        recs = run["records"]
        ax.plot([r["step"] for r in recs], [r["train_loss"] for r in recs], color=color, alpha=0.35, lw=1)
        evals = [r for r in recs if "eval_loss" in r]
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color=color,
                label=f"{kind} ({run['parameters'] / 1e6:.0f}M) eval {evals[-1]['eval_loss']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("book corpus: train (thin) and eval (markers) loss")
    ax.legend()
    fig.tight_layout()
    path = output_dir / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def resolve_tokenizer(name: str) -> str:
    """'smollm2' -> the local SmolLM2 directory (hf_patch.models.smollm2), else a path or hub id as given."""
    if name == "smollm2":
        from hf_patch.models.smollm2 import default_model_dir

        return str(default_model_dir())
    return name


def prepare_tokens(cfg: dict, folder: Path) -> None:
    """Write {train,eval}.npy (uint16 ids) and the tokenizer under `folder`, for machines without the corpus."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer(cfg["tokenizer"]))
    folder.mkdir(parents=True, exist_ok=True)
    data = cfg["data"]
    for name, split, budget in (("train", data.get("train_split", "calibration"), data["train_tokens"]),
                                ("eval", data.get("eval_split", "evaluation"), data["eval_tokens"])):
        ids = tokenize_split(tokenizer, split, int(budget))
        np.save(folder / f"{name}.npy", ids)
        print(f"{folder / name}.npy: {len(ids)} tokens from books:{split}")
    tokenizer.save_pretrained(folder / "tokenizer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML under configs/transnormer/")
    parser.add_argument("--model", choices=MODELS, default="transnormer")
    parser.add_argument("--steps", type=int, help="override steps")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--tokens-dir", help="override data.tokens_dir (prepared uint16 ids)")
    parser.add_argument("--tokenizer", help="override tokenizer (a local directory)")
    parser.add_argument("--prepare-tokens", metavar="DIR", help="only tokenize the corpus into DIR and exit")
    parser.add_argument("--resume", metavar="CHECKPOINT", type=Path,
                        help="continue from a checkpoint-N directory (save_every), under any number of processes")
    args = parser.parse_args(argv)
    cfg = override(load_config(args.config, allowed=KEYS), steps=args.steps, output_dir=args.output_dir,
                   tokenizer=args.tokenizer)
    if args.tokens_dir:
        cfg["data"] = {**cfg["data"], "tokens_dir": args.tokens_dir}
    if args.prepare_tokens:
        prepare_tokens(cfg, Path(args.prepare_tokens))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(cfg, args.model, args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
