"""Flags shared by every script, with the original Flax examples' names and defaults.

A script declares its own task-specific dataclass (sequence lengths, masking rates, ...) and passes it to
`parse_args` next to the shared ones. Defaults never crash: `--eval_steps` falls back to `--logging_steps`,
and sequence lengths fall back to the model's (in the scripts).
"""

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from transformers import HfArgumentParser

from flaxtrain import storage

SECRET_FIELDS = ("hub_token", "token")
HUB_STRATEGIES = ("every_save", "end", "checkpoint")


def expand_home(obj):
    """`~/...` in any text flag becomes the home folder's path (the shell leaves `--flag=~/x` alone)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(obj, f.name, os.path.expanduser(value))


@dataclass
class ModelArguments:
    # Flags that a resumed run may change (see resume.py): they do not change what is trained.
    MAY_CHANGE: ClassVar[tuple] = ("cache_dir", "token", "trust_remote_code")

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Checkpoint (Hub name or local folder) to start from. Leave unset to train from scratch."},
    )
    model_type: Optional[str] = field(
        default=None, metadata={"help": "Model type when training from scratch without --config_name, e.g. roberta."}
    )
    config_name: Optional[str] = field(
        default=None, metadata={"help": "Config name or path if not the same as model_name_or_path."}
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer name or path if not the same as model_name_or_path."}
    )
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Where to store models and datasets downloaded from the Hub."}
    )
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use a fast (Rust) tokenizer."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Computation dtype. Parameters and optimizer state always stay float32.",
            "choices": ["float32", "float16", "bfloat16"],
        },
    )
    token: Optional[str] = field(
        default=None, repr=False, metadata={"help": "Hugging Face token for private models and datasets."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow configs and tokenizers that run code from the Hub."}
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model to use."})

    def __post_init__(self):
        expand_home(self)


@dataclass
class DataArguments:
    MAY_CHANGE: ClassVar[tuple] = ("max_eval_samples", "overwrite_cache", "preprocessing_num_workers")

    dataset_name: Optional[str] = field(default=None, metadata={"help": "Dataset name on the Hub."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Training data: a .txt, .csv, .json or .jsonl file."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Evaluation data, same formats."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of the training data held out when there is no validation split."}
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only this many training examples (for debugging or quick runs)."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only this many evaluation examples."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Redo the cached preprocessing."})
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes for preprocessing."}
    )

    def __post_init__(self):
        expand_home(self)
        if hasattr(super(), "__post_init__"):  # a script's flags that add StreamingArguments
            super().__post_init__()


@dataclass
class StreamingArguments:
    """--streaming, for the pretraining scripts (masked LM, causal LM, T5 span corruption): flaxtrain/streaming.py."""

    streaming: bool = field(
        default=False, metadata={"help": "Read, tokenize and pack the text on the fly, each host only its share of "
                                         "the files or records (for corpora larger than memory); needs --max_steps. "
                                         "--train_file/--validation_file may be a folder or a glob pattern."}
    )
    shuffle_buffer_size: int = field(
        default=10000, metadata={"help": "--streaming: records shuffled together, a window at a time (seeded by "
                                         "--seed; 0 or 1: in file order)."}
    )

    def __post_init__(self):
        if self.streaming and getattr(self, "max_train_samples", None) is not None:
            raise ValueError("--max_train_samples does not apply to --streaming: a stream trains for --max_steps.")


@dataclass
class TrainingArguments:
    # Cadence, reporting, evaluation and where things go; the batch size flags are compared as their product, the
    # examples per update (resume.py).
    MAY_CHANGE: ClassVar[tuple] = (
        "output_dir", "overwrite_output_dir", "do_train", "do_eval", "do_predict", "per_device_train_batch_size",
        "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps", "eval_steps", "save_steps",
        "save_total_limit", "take_over_output_dir", "resume_from_checkpoint", "allow_changed_flags",
        "gradient_checkpointing",
        "fsdp", "tensor_parallel", "logical_axis_rules", "save_dtype", "compilation_cache_dir",
        "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo", "hub_strategy")

    output_dir: str = field(metadata={"help": "Where checkpoints, the exported model, logs and results go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a non-empty output_dir that holds no checkpoint."}
    )
    do_train: bool = field(default=False, metadata={"help": "Train. With none of the --do_* flags: train and eval."})
    do_eval: bool = field(default=False, metadata={"help": "Evaluate on the validation set."})
    do_predict: bool = field(default=False, metadata={"help": "Predict on the test set (scripts that have one)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size per device for training."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Batch size per device for evaluation."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches whose gradients are summed before each optimizer update."}
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    adafactor: bool = field(default=False, metadata={"help": "Use Adafactor instead of AdamW."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip gradients to this global norm (0: off)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Training epochs (a fraction is allowed)."})
    max_steps: int = field(default=-1, metadata={"help": "If > 0: total optimizer steps, overriding epochs."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warmup as a fraction of the total steps."})
    lr_scheduler_type: str = field(
        default="linear",
        metadata={"help": "Decay after warmup.", "choices": ["linear", "cosine", "constant"]},
    )
    logging_steps: int = field(default=500, metadata={"help": "Log training metrics every N steps."})
    eval_steps: Optional[int] = field(
        default=None, metadata={"help": "Evaluate every N steps (default: --logging_steps)."}
    )
    save_steps: int = field(default=500, metadata={"help": "Save a resumable checkpoint and the model every N steps."})
    save_total_limit: Optional[int] = field(
        default=None, metadata={"help": "Keep only the newest N training checkpoints (default: all)."}
    )
    take_over_output_dir: bool = field(
        default=False,
        metadata={"help": "Take output_dir's lock from the run that holds it (one that crashed on another host: a "
                          "run refused for a held lock names its owner). Never while that run still lives."},
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None,
        metadata={
            "help": "A checkpoint folder (output_dir/checkpoints/STEP) to resume from. By default a run resumes "
            "from the newest checkpoint in output_dir; pass 'none' to start over (needs --overwrite_output_dir)."
        },
    )
    allow_changed_flags: Optional[str] = field(
        default=None,
        metadata={"help": "Resume although these flags (comma-separated, or 'all') differ from the checkpoint's run: "
                          "a change on purpose, e.g. learning_rate,max_steps to extend a run with a new schedule. "
                          "Without it a resumed run must have the flags it was saved with."},
    )
    seed: int = field(default=42, metadata={"help": "Seed for initialisation, data order, masking and dropout."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute layer activations in the backward pass to save memory."}
    )
    fsdp: int = field(
        default=1, metadata={"help": "Devices that each parameter and its optimizer state are split over (fully "
                                     "sharded data parallelism); -1: all devices left by --tensor_parallel. The "
                                     "batch is split over every device either way."})
    tensor_parallel: int = field(
        default=1, metadata={"help": "Devices that each layer's attention heads and MLP are split over (best "
                                     "within a host)."})
    logical_axis_rules: Optional[str] = field(
        default=None, metadata={"help": "JSON that overrides the mapping of the models' logical axes onto the mesh, "
                                        "e.g. '{\"vocab\": [\"tensor\"]}' (see flaxtrain/parallel.py's RULES)."})
    save_dtype: str = field(
        default="float32", metadata={"help": "dtype of the exported model's weights (model.safetensors).",
                                     "choices": ["float32", "bfloat16", "float16"]})
    compilation_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Where compiled steps are kept, so that a rerun or a resumed run does not "
                                        "compile them again (default: JAX_COMPILATION_CACHE_DIR, else "
                                        "~/.cache/flaxtrain/jax); none: off."})
    load_best_model_at_end: bool = field(
        default=False,
        metadata={"help": "Keep the model of the best evaluation (by --metric_for_best_model) as the final model, "
                          "in output_dir, instead of the last one."},
    )
    metric_for_best_model: Optional[str] = field(
        default=None, metadata={"help": "Evaluation metric that picks the best model (default: the task's main one)."}
    )
    greater_is_better: Optional[bool] = field(
        default=None, metadata={"help": "Whether a larger --metric_for_best_model is better (default: yes, except "
                                        "for losses)."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the model and logs to the Hugging Face Hub."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Repository name on the Hub."})
    hub_token: Optional[str] = field(
        default=None, repr=False,
        metadata={"help": "Token for the Hub (default: HF_TOKEN, or the login saved by `hf auth login`)."},
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    hub_strategy: str = field(
        default="every_save",
        metadata={"help": "What --push_to_hub uploads when: every_save (model, logs and results at every save and "
                          "at the end), end (only at the end), checkpoint (every_save plus the resumable training "
                          "state in last-checkpoint/).", "choices": list(HUB_STRATEGIES)},
    )

    def __post_init__(self):
        self.output_dir = storage.absolute(self.output_dir)  # means the same after a chdir; orbax needs it
        if self.eval_steps is None:
            self.eval_steps = self.logging_steps
        if not (self.do_train or self.do_eval or self.do_predict):
            # The original scripts trained (and evaluated at --eval_steps) without any --do_* flag, and their
            # README commands rely on it.
            self.do_train = self.do_eval = True
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "eval_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.do_train and not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be more than 0, got {self.learning_rate}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.load_best_model_at_end and not (self.do_train and self.do_eval):
            raise ValueError("--load_best_model_at_end needs --do_train and --do_eval (the best model is chosen by "
                             "the evaluations during training).")
        if self.hub_strategy not in HUB_STRATEGIES:  # argparse checks choices, a .json file of flags does not
            raise ValueError(f"--hub_strategy must be one of {', '.join(HUB_STRATEGIES)}, got {self.hub_strategy!r}.")


def parse_args(dataclass_types, argv=None):
    """Parses `argv` (default: sys.argv[1:]) into instances of `dataclass_types`.

    A single argument ending in `.json` is read as the whole set of flags, as in the original scripts.
    Unknown flags are an error.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(dataclass_types, allow_abbrev=False)  # a typo is an error, not a guess
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def args_to_dict(*arg_objects) -> dict:
    """All flags as one JSON-ready dict, with secrets removed (for saved args, logs and TensorBoard)."""
    flags = {}
    for obj in arg_objects:
        flags.update(dataclasses.asdict(obj))
    return {k: v for k, v in flags.items() if k not in SECRET_FIELDS}
