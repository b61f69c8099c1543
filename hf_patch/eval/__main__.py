"""`python -m hf_patch.eval ARGS` is `hf-patch eval ARGS`; data-parallel, one model replica per process:

    accelerate launch -m hf_patch.eval run --model hf-loki --model_args pretrained=smollm2,basis=... --tasks ...
"""
import sys

from hf_patch.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
