"""`python -m hf_patch ARGS` is `hf-patch ARGS`; e.g. data-parallel, one model replica per process:

    accelerate launch -m hf_patch eval run --model hf-loki --model_args pretrained=smollm2,basis=... --tasks ...
    accelerate launch --num_processes 4 -m hf_patch calibrate --config configs/loki/calibrate_smollm2.yaml
"""
import sys

from hf_patch.app.cli import main

sys.exit(main())
