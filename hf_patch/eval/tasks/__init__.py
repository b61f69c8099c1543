"""lm-eval task definitions of hf-patch (YAML) and their dataset loader; a package so that wheels ship utils.py."""
