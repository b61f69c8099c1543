"""The `hf-loki` lm-eval model: lm-eval's `HFLM` with hf-patch models and, optionally, Loki attention.

    lm-eval run --model hf-loki --model_args pretrained=smollm2,basis=outputs/smollm2/basis-pre,d_frac=0.25 ...

Model args beyond HFLM's own: `basis` (a saved `PCABasis` directory; without it the model runs full attention),
every setting of `patch_loki` by its name (the fields of `LokiSettings`: `d_frac`, `k_frac`, `k_tokens`, ...;
patch_loki's defaults where not given) except that `mode` defaults to "all" (Loki on every query row of
teacher-forced scoring; "decode": what generation computes: each request's context is scored with exact attention,
as a prefill, and every continuation token after the first attends with Loki over the keys before it, as a decode
step; `generate_until` decodes with the Loki cache), and `rotary` (optional check: "pre"/"post" must match the
basis); all are checked (`LmEvalLoki`) before the model loads.
`pretrained="smollm2"` is the embedded SmolLM2-135M-Instruct.
Importing hf_patch registers its TransNormer models with the Auto classes, so they load like any `hf` model.

Beyond one device, as HFLM does it: `accelerate launch -m hf_patch eval run --model hf-loki ...` runs one replica per
process, each loaded on its process's device and patched there, with the requests split over the processes (also
on CPU processes and with one GPU, where HFLM alone would have every process score every request);
`parallelize=True` spreads the layers over the GPUs (accelerate's `device_map`), each layer's basis on its device.

This module imports lm-eval: it is loaded only by `hf-patch eval`/`compare` and lm-eval's entry point.
"""
from __future__ import annotations

import difflib
import re
from typing import Any

import torch
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.huggingface import HFLM

from hf_patch.config import ConfigError
from hf_patch.loki.basis import PCABasis
from hf_patch.loki.patch import patch_loki

MODEL_NAME = "hf-loki"


class LokiHFLM(HFLM):
    """HFLM that resolves hf-patch model names and patches the loaded model with Loki when `basis` is given."""

    def __init__(
        self,
        pretrained: Any = "smollm2",
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        import hf_patch.transnormer  # noqa: F401  (registers TransNormer with AutoModelForCausalLM)
        from hf_patch.loki.settings import LmEvalLoki
        from hf_patch.models.smollm2 import resolve_model
        from hf_patch.parallel import use_cpu_processes

        # the Loki args given (basis, d_frac, ..., rotary); the others take LmEvalLoki's (patch_loki's) defaults
        given = {name: kwargs.pop(name) for name in LmEvalLoki.keys() if name in kwargs}
        source = f"{MODEL_NAME} model args"
        settings = LmEvalLoki.from_dict(given, source)  # checked, and the basis read, before the model loads
        for name in kwargs:  # the rest go to HFLM and from_pretrained: a misspelt Loki arg would not reach Loki
            if close := difflib.get_close_matches(name, LmEvalLoki.keys(), n=1, cutoff=0.75):
                raise ConfigError(f"{source}: unknown arg {name!r}; did you mean {close[0]!r}?")
        basis = None if settings.basis is None else load_basis(settings.basis, settings.rotary)
        if isinstance(pretrained, str):
            pretrained = resolve_model(pretrained)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        use_cpu_processes()  # launched on a machine without GPUs: accelerate's processes talk over gloo
        try:
            super().__init__(pretrained=pretrained, device=device, **kwargs)
        except TypeError as err:  # an arg neither HFLM nor the model's from_pretrained takes
            name = re.search(r"unexpected keyword argument '(\w+)'", str(err))
            if name is None or name[1] not in kwargs:
                raise
            raise ConfigError(f"{source}: unknown arg {name[1]!r}: not a Loki setting ({', '.join(LmEvalLoki.keys())})"
                              ", nor an argument of lm-eval's HFLM or of the model's from_pretrained") from None
        self._split_over_processes()
        self.loki = settings if basis is not None else None  # the settings patched, or None: full attention
        if self.loki is not None:
            patch_loki(self.model, basis, self.loki.patch_settings())

    def _split_over_processes(self) -> None:
        """HFLM splits the requests over launched processes only when it counts more than one GPU; with one or none
        every process would score every request. Give each process its share there too."""
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1:
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes

    def _loglikelihood_tokens(self, requests, *args: Any, **kwargs: Any):
        """With Loki, note each request's input, and where its decode rows start, before HFLM batches them: the
        input it builds is (context + continuation)[-(max_length + 1):][:-1], whose last len(continuation) - 1 rows
        read continuation tokens, i.e. the rows a generation would compute as decode steps."""
        if self.loki is None:
            return super()._loglikelihood_tokens(requests, *args, **kwargs)
        self._inputs = {}
        for _, context, continuation in requests:
            inp = tuple((context + continuation)[-(self.max_length + 1):][:-1])
            self._inputs[inp] = max(0, len(inp) - len(continuation) + 1)
        try:
            return super()._loglikelihood_tokens(requests, *args, **kwargs)
        finally:
            del self._inputs

    def _model_call(self, inps: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """HFLM's forward; with Loki, scoring a batch that HFLM padded on the right passes a mask that ends each row
        at its request's input (HFLM passes none), so that a request's scores do not depend on the requests batched
        with it (the paper rule's window is the request's own, not the batch's width), nor on how lm-eval splits
        them over processes; in mode "decode", inside `decode_rows` at each row's first decode row."""
        inputs = getattr(self, "_inputs", None)
        if inputs is None or args or kwargs:
            return super()._model_call(inps, *args, **kwargs)
        import contextlib

        from hf_patch.loki.patch import decode_rows

        found = [_request_of(row, inputs) for row in inps.tolist()]
        lengths = [length for length, _ in found]
        mask = None
        if min(lengths) < inps.shape[1]:
            ends = torch.tensor(lengths, device=inps.device)[:, None]
            mask = (torch.arange(inps.shape[1], device=inps.device)[None] < ends).long()
        rows = (decode_rows(self.model, [start for _, start in found]) if self.loki.mode == "decode"
                else contextlib.nullcontext())
        autocast = torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                  enabled=self.mixed_precision_dtype is not None)  # as HFLM's own call
        with rows, torch.no_grad(), autocast:
            return self.model(inps, attention_mask=mask).logits

    def get_model_info(self) -> dict[str, Any]:
        """HFLM's model info plus the Loki settings (None for full attention), recorded in lm-eval's results."""
        loki = None if self.loki is None else {"basis": self.loki.basis, **self.loki.patch_settings().as_dict()}
        return {**super().get_model_info(), "loki": loki}


def _request_of(row: list[int], inputs: dict[tuple[int, ...], int]) -> tuple[int, int]:
    """(input length, first decode row) of the request behind one right-padded input row: its input is the shortest
    prefix of `row` that a request built with only padding (zeros) after it."""
    length = len(row)
    while length and row[length - 1] == 0:
        length -= 1
    for end in range(length, len(row) + 1):  # a request whose input ends in token 0 looks shorter: try longer
        if (start := inputs.get(tuple(row[:end]))) is not None and not any(row[end:]):
            return end, start
    raise RuntimeError("an lm-eval input row matches no loglikelihood request: cannot tell its length")


def load_basis(basis: str, rotary: str | None = None) -> PCABasis:
    """The basis saved at `basis`, its rotary variant checked against `rotary` (None: any)."""
    loaded = PCABasis.load(basis)
    if rotary is not None and rotary != loaded.rotary:
        raise ValueError(f"rotary={rotary!r} but the basis in {basis} was calibrated on {loaded.rotary}-RoPE keys: "
                         f"pass rotary={loaded.rotary} or a basis calibrated with rotary={rotary}")
    return loaded


def register() -> type[LokiHFLM]:
    """Make `hf-loki` known to lm-eval's model registry (idempotent; an entry-point registration is kept)."""
    if MODEL_NAME not in model_registry:
        register_model(MODEL_NAME)(LokiHFLM)
    return LokiHFLM


register()
