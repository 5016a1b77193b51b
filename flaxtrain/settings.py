"""The one place that reads the scripts' flag objects: it turns them into the typed values the library takes.

Everything below the scripts takes these values (or plain arguments), never a flag object, so that a test or a
user's own training loop can call it without building flags. A script reads its own task flags itself.
"""

import dataclasses
import os
from typing import Optional

import jax

from flaxtrain.args import SECRET_FIELDS, args_to_dict

BATCH = "examples_per_update"  # per_device_train_batch_size x devices x gradient_accumulation_steps


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the tokenizer, config and weights come from: Hub names, local folders or gs:// folders."""

    name_or_path: Optional[str]
    config_name: Optional[str] = None
    tokenizer_name: Optional[str] = None
    model_type: Optional[str] = None
    revision: str = "main"
    token: Optional[str] = None
    cache_dir: Optional[str] = None
    trust_remote_code: bool = False
    use_fast_tokenizer: bool = True
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where the examples come from: a Hub dataset or local files, and the share held out for evaluation."""

    dataset_name: Optional[str] = None
    dataset_config: Optional[str] = None
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    validation_split_percentage: int = 5
    cache_dir: Optional[str] = None
    token: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Streaming:
    """--streaming: the shuffle window (examples) and the Grain worker processes that tokenize."""

    shuffle_buffer: int = 10_000
    workers: int = 0


@dataclasses.dataclass(frozen=True)
class Optimization:
    """The optimizer, its schedule and the run's length."""

    learning_rate: float
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    adafactor: bool = False
    max_grad_norm: float = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "linear"
    per_device_batch: int = 8
    accumulation_steps: int = 1

    @property
    def update_batch(self) -> int:
        """Examples per optimizer update, over every device."""
        return self.per_device_batch * jax.device_count() * self.accumulation_steps


@dataclasses.dataclass(frozen=True)
class Cadence:
    """How often the loop logs, evaluates and saves, and the seed of everything random."""

    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    seed: int = 42


@dataclasses.dataclass(frozen=True)
class BestModelChoice:
    """--load_best_model_at_end: the metric (None: the task's main one) and its direction (None: guessed)."""

    metric: Optional[str] = None
    greater_is_better: Optional[bool] = None


@dataclasses.dataclass(frozen=True)
class Output:
    """The run's output_dir and what it may do there."""

    directory: str
    overwrite: bool = False
    resume_from: Optional[str] = None  # None: the newest checkpoint; "none": none; a path: that one
    allowed_changes: frozenset = frozenset()  # flags a resumed run may change (--allow_changed_flags)
    take_over: bool = False  # take the lock of a run that is gone
    save_total_limit: Optional[int] = None
    save_dtype: str = "float32"
    best: Optional[BestModelChoice] = None


@dataclasses.dataclass(frozen=True)
class MeshShape:
    fsdp: int = 1
    tensor_parallel: int = 1
    logical_axis_rules: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class HubTarget:
    """--push_to_hub: where and when."""

    model_id: Optional[str] = None
    token: Optional[str] = None
    private: bool = False
    strategy: str = "every_save"


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything the lifecycle (flaxtrain/lifecycle.py) and the library below it take from the flags."""

    model: ModelSource
    data: DataSource
    streaming: Optional[Streaming]  # None: in memory
    optimization: Optimization
    cadence: Cadence
    output: Output
    mesh: MeshShape
    hub: Optional[HubTarget]  # None: no --push_to_hub
    do_train: bool
    do_eval: bool
    do_predict: bool
    gradient_checkpointing: bool
    eval_batch: int  # per device
    compilation_cache_dir: Optional[str]
    identity: dict  # what a checkpoint records of its run and a resume compares (resume.check_same_run)
    flags: dict  # every flag but secrets, for training_args.json and the model card
    changed_flags: dict  # those not at their defaults: the model card's command line


def from_flags(model_args, data_args, training_args) -> RunSettings:
    t, m, d = training_args, model_args, data_args
    return RunSettings(
        model=ModelSource(m.model_name_or_path, m.config_name, m.tokenizer_name, m.model_type, m.model_revision,
                          m.token, m.cache_dir, m.trust_remote_code, m.use_fast_tokenizer, m.dtype),
        data=DataSource(getattr(d, "dataset_name", None), getattr(d, "dataset_config_name", None),
                        getattr(d, "train_file", None), getattr(d, "validation_file", None),
                        getattr(d, "test_file", None), getattr(d, "validation_split_percentage", 5),
                        m.cache_dir, m.token),
        streaming=Streaming(d.shuffle_buffer_size, d.preprocessing_num_workers or 0)
        if getattr(d, "streaming", False) else None,
        optimization=Optimization(t.learning_rate, t.weight_decay, t.adam_beta1, t.adam_beta2, t.adam_epsilon,
                                  t.adafactor, t.max_grad_norm, t.num_train_epochs, t.max_steps, t.warmup_steps,
                                  t.warmup_ratio, t.lr_scheduler_type, t.per_device_train_batch_size,
                                  t.gradient_accumulation_steps),
        cadence=Cadence(t.logging_steps, t.eval_steps, t.save_steps, t.seed),
        output=Output(t.output_dir, t.overwrite_output_dir, t.resume_from_checkpoint,
                      frozenset(name.strip().lstrip("-") for name in (t.allow_changed_flags or "").split(",")
                                if name.strip()),
                      t.take_over_output_dir, t.save_total_limit, t.save_dtype,
                      BestModelChoice(t.metric_for_best_model, t.greater_is_better)
                      if t.load_best_model_at_end else None),
        mesh=MeshShape(t.fsdp, t.tensor_parallel, t.logical_axis_rules),
        hub=HubTarget(t.hub_model_id, t.hub_token, t.hub_private_repo, t.hub_strategy) if t.push_to_hub else None,
        do_train=t.do_train, do_eval=t.do_eval, do_predict=t.do_predict,
        gradient_checkpointing=t.gradient_checkpointing, eval_batch=t.per_device_eval_batch_size,
        compilation_cache_dir=t.compilation_cache_dir,
        identity=identity(training_args, model_args, data_args),
        flags=args_to_dict(model_args, data_args, training_args),
        changed_flags=changed_flags(model_args, data_args, training_args))


def changed_flags(*arg_objects) -> dict:
    """The flags not at their defaults, secrets left out."""
    changed = {}
    for obj in arg_objects:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name in SECRET_FIELDS or value is None:
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if value != default:
                changed[f.name] = value
    return changed


# ------------------------------------------------------------------------------------------- the run's identity
def run_flags(*arg_objects) -> dict:
    """The flags that make a run what it is: every flag but those its dataclass lists in MAY_CHANGE, paths that
    exist here made absolute (so a relative path and its absolute form agree), and --num_train_epochs only when
    --max_steps does not override it."""
    flags = {}
    for obj in arg_objects:
        free = {name for cls in type(obj).__mro__ for name in getattr(cls, "MAY_CHANGE", ())}
        for field in dataclasses.fields(obj):
            if field.name not in free:
                value = getattr(obj, field.name)
                if isinstance(value, str) and os.path.exists(value):
                    value = os.path.abspath(value)
                flags[field.name] = value
    if flags.get("max_steps", -1) > 0:
        flags.pop("num_train_epochs", None)
    return flags


def identity(training, *arg_objects) -> dict:
    """What a checkpoint records of its run (and what a resume compares): the flags and the examples per update.
    training: the TrainingArguments."""
    per_device, accumulation = training.per_device_train_batch_size, training.gradient_accumulation_steps
    return {"flags": run_flags(training, *arg_objects),
            BATCH: {"value": per_device * jax.device_count() * accumulation,
                    "how": f"{per_device} x {jax.device_count()} devices x {accumulation}"}}
