import os

# The scripts use transformers for configs and tokenizers only. Where torch is not installed (a TPU VM), its import
# advises that "PyTorch was not found. Models won't be available": noise on every start of every script.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
