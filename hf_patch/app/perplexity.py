"""`hf-patch perplexity`: perplexity of a model, full attention or Loki, on held-out text (`hf_patch.eval.perplexity`)."""
from __future__ import annotations

import argparse
import json
from ..config import DTYPES
from ..eval.perplexity import DecodeEvaluation, Evaluation, decode_perplexity, decode_windows, perplexity
from ..loki.settings import LokiSettings
from ..parallel import resolve_device
from .cli import add_schema_flags, schema_flags

SET_HERE = ("mode", "cuda_graph")  # mode: by --prefix; perplexity generates nothing to graph


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="'smollm2' (default, embedded), a local dir or a hub id")
    parser.add_argument("--basis", default=None, help="Loki basis dir; omit for full attention")
    add_schema_flags(parser, LokiSettings, exclude=SET_HERE)  # patch_loki's settings, one flag each
    parser.add_argument("--dataset", help="default: books:evaluation (mode all), books:evaluation:by-book (--prefix)")
    parser.add_argument("--text-column", help="the dataset's column holding the text (default: text)")
    parser.add_argument("--seq-len", default=1024, help="window length (mode all)")
    parser.add_argument("--max-tokens", default=32_768)
    parser.add_argument("--batch-size", default=1)
    parser.add_argument("--prefix", default=None,
                        help="decode-equivalent: prefill this many tokens densely, score the next --new-tokens as "
                             "generated tokens (Loki decode steps), in --windows windows; without it: mode all")
    parser.add_argument("--new-tokens", default=512)
    parser.add_argument("--windows", default=4)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    from ..loki.basis import PCABasis
    from ..loki.patch import patch_loki
    from ..models.smollm2 import load_model

    # every flag and the basis are checked before the model loads
    source = "hf-patch perplexity"
    dataset = {k: v for k, v in (("dataset", args.dataset), ("text_column", args.text_column))
               if v is not None}  # else each evaluation's default
    data = Evaluation.from_dict(dict(seq_len=args.seq_len, max_tokens=args.max_tokens, batch_size=args.batch_size,
                                     **dataset), source)
    decode = args.prefix is not None
    given = schema_flags(args, LokiSettings, exclude=SET_HERE)
    loki = LokiSettings.from_dict({**given, "mode": "decode" if decode else "all"}, source)
    windows = None
    if decode:
        windows = DecodeEvaluation.from_dict(dict(prefix=args.prefix, new_tokens=args.new_tokens,
                                                  windows=args.windows, **dataset), source)
    device = resolve_device(args.device)
    basis = PCABasis.load(args.basis) if args.basis else None
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    if windows is not None:
        setting = ("loki", lambda m: patch_loki(m, basis, loki)) if basis else ("full", None)
        tokens = decode_windows(tokenizer, windows.dataset, windows.prefix + windows.new_tokens + 1, windows.windows,
                                text_column=windows.text_column)
        result = decode_perplexity(model, tokens, windows.prefix, [setting])[setting[0]]
    else:
        if basis is not None:
            patch_loki(model, basis, loki)
        result = perplexity(model, tokenizer, data.dataset, data.seq_len, data.max_tokens, data.batch_size,
                            text_column=data.text_column)
    settings = {**loki.as_dict(), "basis": args.basis} if basis is not None else None
    print(json.dumps({**result, "loki": settings}, indent=2))
    return 0
