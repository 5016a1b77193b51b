#!/usr/bin/env python3
"""Fine-tuning an encoder (BERT, RoBERTa, XLM-R, ALBERT, DeBERTa-v3, ModernBERT...: the README's models table) or
BART for sequence classification or regression: the GLUE tasks, or your own labelled csv/json files, with JAX on TPUs,
GPUs or CPUs.

Typical use, MRPC from the Hub:

    python run_flax_glue.py --model_name_or_path=bert-base-cased --task_name=mrpc --max_seq_length=128 \
        --learning_rate=2e-5 --num_train_epochs=3 --per_device_train_batch_size=4 --eval_steps=100 \
        --output_dir=./bert-mrpc --load_best_model_at_end

Your own data: --train_file/--validation_file/--test_file (csv or json) with `sentence1` and `sentence2` (pairs) or
`sentence` columns (or --text_column_name) and a `label` column holding any label strings, or numbers for
regression. Run the same command again to resume from the newest checkpoint in output_dir.
"""

import functools
import logging
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
import sklearn.metrics

from flaxtrain import data, exits, lifecycle, loop, models, packing, parallel, storage, training
from flaxtrain.args import DataArguments, ModelArguments, TrainingArguments, parse_args

logger = logging.getLogger("run_flax_glue")

TASK_TO_KEYS = {
    "cola": ("sentence", None), "mnli": ("premise", "hypothesis"), "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"), "qqp": ("question1", "question2"), "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None), "stsb": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}
# The metric that GLUE reports first for a task, and that picks the best model by default.
MAIN_METRIC = {"cola": "matthews_correlation", "mrpc": "f1", "qqp": "f1", "stsb": "pearson"}


# ----------------------------------------------------------------------------------------------- arguments
@dataclass
class GlueModelArguments(ModelArguments):
    use_slow_tokenizer: bool = field(default=False, metadata={"help": "Use the Python tokenizer, not the fast one."})

    def __post_init__(self):
        super().__post_init__()
        if self.use_slow_tokenizer:  # the original's spelling of --use_fast_tokenizer=false
            self.use_fast_tokenizer = False


@dataclass
class GlueDataArguments(DataArguments):
    MAY_CHANGE: ClassVar[tuple] = ("test_file", "max_predict_samples")
    task_name: Optional[str] = field(
        default=None, metadata={"help": f"A GLUE task: {', '.join(TASK_TO_KEYS)}. With --train_file etc. it picks "
                                        "the task's columns and metrics for local copies of its data."}
    )
    test_file: Optional[str] = field(default=None, metadata={"help": "Data to predict with --do_predict (csv/json)."})
    text_column_name: Optional[str] = field(
        default=None, metadata={"help": "The text column, or two comma-separated columns for sentence pairs "
                                        "(default: sentence1,sentence2 or sentence)."}
    )
    label_column_name: Optional[str] = field(default=None, metadata={"help": "The label column (default: label)."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example; longer inputs are truncated."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every batch to max_seq_length. Otherwise a batch is padded to the "
                                         "smallest of a few bucket lengths that fits it (fewer compiled shapes "
                                         "than padding to each batch's longest)."}
    )
    max_predict_samples: Optional[int] = field(default=None, metadata={"help": "Predict on at most N examples."})

    def __post_init__(self):
        super().__post_init__()
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in TASK_TO_KEYS:
                raise ValueError(f"--task_name={self.task_name}: not a GLUE task; the tasks are "
                                 f"{', '.join(TASK_TO_KEYS)}.")
            if not (self.dataset_name or self.train_file or self.validation_file or self.test_file):
                self.dataset_name, self.dataset_config_name = "nyu-mll/glue", self.task_name  # the task on the Hub


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class Task:
    """What the data says about the task: text columns, label column and label names (None: regression)."""

    name: Optional[str]
    keys: tuple
    label_column: str
    labels: Optional[list]

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def main_metric(self) -> str:
        return "pearson" if self.is_regression else MAIN_METRIC.get(self.name, "accuracy")


def eval_and_test_splits(raw, task_name):
    """{split: results prefix} to evaluate and to predict (MNLI on the Hub has matched and mismatched sets)."""
    evals = {s: p for s, p in (("validation", "eval"), ("validation_matched", "eval"),
                               ("validation_mismatched", "eval_mm")) if s in raw}
    tests = {s: p for s, p in (("test", task_name or ""), ("test_matched", task_name or ""),
                               ("test_mismatched", f"{task_name}-mm")) if s in raw}
    return evals, tests


def find_task(raw, data_args, hf_config, do_train: bool) -> Task:
    """Text and label columns, checked in every split, and the label names in the order of their ids."""
    split_names = list(raw)
    label_column = data_args.label_column_name or "label"
    if data_args.text_column_name:
        keys = tuple(data_args.text_column_name.split(","))
        if len(keys) > 2:
            raise ValueError(f"--text_column_name={data_args.text_column_name}: one column, or two for pairs.")
    elif data_args.task_name:
        keys = TASK_TO_KEYS[data_args.task_name]
    else:
        columns = raw[split_names[0]].column_names
        keys = ("sentence1", "sentence2" if "sentence2" in columns else None) if "sentence1" in columns else \
            ("sentence", None)
    keys = tuple(k for k in keys if k)
    for split in split_names:
        columns = raw[split].column_names
        needed = keys + (() if split.startswith("test") else (label_column,))
        missing = [k for k in needed if k not in columns]
        if missing:
            raise ValueError(f"The {split} data has no column {', '.join(map(repr, missing))}; its columns are "
                             f"{', '.join(columns)}. Name the text column(s) with --text_column_name and the labels "
                             "with --label_column_name.")

    labelled = [s for s in split_names if label_column in raw[s].column_names]
    feature = raw[labelled[0]].features[label_column]
    if data_args.task_name == "stsb" or getattr(feature, "dtype", "").startswith("float"):
        return Task(data_args.task_name, keys, label_column, None)
    if hasattr(feature, "names"):  # a ClassLabel (the Hub's GLUE): ids and names are given
        return Task(data_args.task_name, keys, label_column, list(feature.names))

    # A test file without labels may still have the column, empty (the csv builder gives all files its columns).
    seen = {s: {str(v) for v in raw[s][label_column] if v is not None} for s in labelled}
    for split, values in seen.items():
        _check_label_kinds(values, split, label_column, data_args)
    model_labels = [hf_config.id2label[i] for i in sorted(hf_config.id2label)]
    if any(name != f"LABEL_{i}" for i, name in enumerate(model_labels)) and (
            not do_train or set(model_labels) == seen.get("train")):
        labels, source = model_labels, "the model's config (id2label)"  # a fine-tuned classifier: keep its ids
    elif "train" in seen:
        labels, source = sorted(seen["train"], key=_label_order), "the training data"
    else:
        raise ValueError("Without --do_train the labels come from the model's config (id2label), but it has only "
                         f"the default names {model_labels}.")
    for split, values in seen.items():
        unknown = sorted(values - set(labels), key=_label_order)
        if unknown:
            raise ValueError(f"The {split} data has labels that {source} does not have: {', '.join(unknown[:20])} "
                             f"(known: {', '.join(labels[:20])}).")
    return Task(data_args.task_name, keys, label_column, labels)


def _check_label_kinds(values: set, split: str, column: str, data_args):
    """Labels that mix numbers and words (a stray "positive" among scores, or "1" among names) would silently
    become one class per distinct value: refuse them, with examples of each kind."""
    numbers = sorted((v for v in values if _label_order(v)[0] == 0), key=_label_order)
    words = sorted(values.difference(numbers))
    if numbers and words:
        path = getattr(data_args, f"{split}_file", None)
        where = f"--{split}_file={path}" if path else f"The {split} data"
        raise ValueError(f"{where}: the label column '{column}' mixes numbers ({', '.join(numbers[:3])}) and words "
                         f"({', '.join(words[:3])}). Use class names only, or numbers only (whole numbers are "
                         "classes, decimals a regression).")


def _label_order(label: str):
    """Numbers in numeric order (so "2" < "10"), then other names alphabetically."""
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


def tokenize(dataset, tokenizer, task: Task, max_len: int, data_args):
    """input_ids, token_type_ids (if the tokenizer makes them), length and label (NaN / -1 where unlabelled)."""
    label_ids = None if task.is_regression else {name: i for i, name in enumerate(task.labels)}
    has_labels = task.label_column in dataset.column_names
    class_ids = isinstance(dataset.features.get(task.label_column), datasets.ClassLabel)  # the Hub's GLUE

    def encode(examples):
        texts = [examples[k] for k in task.keys]
        encoded = tokenizer(*texts, truncation=True, max_length=max_len, return_attention_mask=False)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        values = examples[task.label_column] if has_labels else [None] * len(encoded["length"])
        if task.is_regression:
            encoded["labels"] = [np.nan if v is None else float(v) for v in values]
        else:  # -1: no label (GLUE's test sets have -1 too)
            encoded["labels"] = [-1 if v is None else v if class_ids else label_ids[str(v)] for v in values]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names,
                       num_proc=data_args.preprocessing_num_workers, load_from_cache_file=not data_args.overwrite_cache)


def bucket_lengths(max_len: int, pad_to_max_length: bool) -> list[int]:
    """Padded lengths a batch may have: powers of two from 16, and max_len (packing.bucket_lengths)."""
    return [max_len] if pad_to_max_length else packing.bucket_lengths(max_len)


def gather(dataset, indices, width, pad_id, is_regression):
    """Examples `indices` (this host's rows of a global batch) as [b, width] arrays, padded (packing.bucket_width)."""
    examples = dataset[indices.tolist()]
    input_ids, real = packing.padded(examples["input_ids"], width, pad_id)
    token_type_ids = (packing.padded(examples["token_type_ids"], width, 0)[0] if "token_type_ids" in examples
                      else np.zeros_like(input_ids))
    batch = {"input_ids": input_ids, "attention_mask": real.astype(np.int32), "token_type_ids": token_type_ids}
    labels = np.asarray(examples["labels"], np.float32 if is_regression else np.int32)
    known = ~np.isnan(labels) if is_regression else labels >= 0
    batch["labels"] = np.where(known, labels, 0).astype(labels.dtype)
    batch["weights"] = known.astype(np.float32)  # unlabelled test rows count in no loss
    return batch


# --------------------------------------------------------------------------------------------------- steps
def loss_sum(logits, batch, is_regression):
    """Summed loss over the rows with weight: MSE of the single output (regression), else cross-entropy."""
    if is_regression:
        return (jnp.square(logits[:, 0] - batch["labels"]) * batch["weights"]).sum()
    return training.cross_entropy_sums(logits, batch["labels"], batch["weights"])[0]


def forward(state, params, batch, **kwargs):
    return state.apply_fn({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                          **kwargs)


def train_step(state, batch, rng, accumulation_steps, is_regression):
    """The loss is the mean over every example of the global batch."""
    rng = jax.random.fold_in(rng, state.step)
    total_weight = jnp.maximum(batch["weights"].sum(), 1.0)

    def loss_fn(params, micro, rng):
        logits = forward(state, params, micro, deterministic=False, rngs={"dropout": rng})
        total = loss_sum(logits, micro, is_regression)
        return total / total_weight, total

    grads, total = training.accumulate_gradients(loss_fn, state.params, batch, rng, accumulation_steps)
    return state.apply_gradients(grads=grads), {"loss_sum": total, "weight": total_weight}


def eval_step(state, batch, is_regression):
    """Loss sums, and the logits of the whole global batch (so that metrics see every example)."""
    logits = forward(state, state.params, batch)
    return {"loss": loss_sum(logits, batch, is_regression), "weight": batch["weights"].sum(), "logits": logits}


def compute_metrics(task: Task, predictions, labels) -> dict:
    """GLUE's metrics for the task (accuracy and F1 for your own classification data)."""
    if task.is_regression:
        return {"pearson": float(scipy.stats.pearsonr(predictions, labels)[0]),
                "spearmanr": float(scipy.stats.spearmanr(predictions, labels)[0])}
    metrics = {"accuracy": float((predictions == labels).mean())}
    if task.name == "cola":
        metrics["matthews_correlation"] = float(sklearn.metrics.matthews_corrcoef(labels, predictions))
    elif task.name in ("mrpc", "qqp") or (task.name is None and len(task.labels) == 2):
        metrics["f1"] = float(sklearn.metrics.f1_score(labels, predictions, labels=[0, 1], zero_division=0))
    elif task.name is None:
        metrics["f1"] = float(sklearn.metrics.f1_score(labels, predictions, labels=list(range(len(task.labels))),
                                                       average="macro", zero_division=0))
    return metrics


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    model_args, data_args, training_args = parse_args(
        (GlueModelArguments, GlueDataArguments, TrainingArguments), argv)
    with lifecycle.Job(model_args, data_args, training_args, task="text-classification") as job:
        run(job, data_args, training_args)


def run(job, data_args, training_args):
    # Cheap checks first: tokenizer, config and model family, then the data and its labels.
    if not job.model_source.name_or_path:
        logger.warning("No --model_name_or_path: the classifier starts from random weights.")
    tokenizer = job.tokenizer()
    hf_config = job.config()
    models.get_family(hf_config.model_type)  # (a model type we lack fails before the data is read)
    raw = data.load_raw_datasets(job.settings.data, training_args.do_train, training_args.do_eval,
                                 need_test=training_args.do_predict,
                                 eval_splits=("validation", "validation_matched"))
    task = find_task(raw, data_args, hf_config, training_args.do_train)
    logger.info("Task: %s", "regression" if task.is_regression else f"{len(task.labels)} labels {task.labels}")
    if task.is_regression:
        hf_config.num_labels, hf_config.problem_type = 1, "regression"
    else:
        hf_config.num_labels = len(task.labels)
        hf_config.id2label = dict(enumerate(task.labels))
        hf_config.label2id = {name: i for i, name in enumerate(task.labels)}
        hf_config.problem_type = "single_label_classification"
    family, model = job.model(hf_config, tokenizer, "SequenceClassification")
    max_len = min(data_args.max_seq_length, tokenizer.model_max_length)
    if max_len < data_args.max_seq_length:
        logger.warning("--max_seq_length=%d is more than the tokenizer's model_max_length: using %d.",
                       data_args.max_seq_length, max_len)
    if max_len > family.max_positions(model.config):
        raise ValueError(f"--max_seq_length={max_len} is more than the model's {family.max_positions(model.config)} "
                         "positions.")

    evals, tests = eval_and_test_splits(raw, data_args.task_name)
    wanted = {"train": training_args.do_train, **{s: training_args.do_eval for s in evals},
              **{s: training_args.do_predict for s in tests}}
    limits = {"train": data_args.max_train_samples, **{s: data_args.max_eval_samples for s in evals},
              **{s: data_args.max_predict_samples for s in tests}}
    splits = {s: tokenize(data.take(raw[s], limits[s]), tokenizer, task, max_len, data_args)
              for s, w in wanted.items() if w}
    lengths = {s: np.asarray(ds["length"][:]) for s, ds in splits.items()}
    buckets = bucket_lengths(max_len, data_args.pad_to_max_length)

    # The optimizer, the mesh and the train state split over it. A pretrained body under a new head: the head
    # starts fresh, pretraining heads are left out.
    train_examples = len(splits["train"]) if training_args.do_train else 0
    state = job.prepare(train_examples, fresh=family.hf.classifier_head, drop=family.hf.pretraining_heads)
    mesh, update_batch, eval_batch = job.mesh, job.update_batch, job.eval_batch
    p_eval_step = job.layout.eval_step(functools.partial(eval_step, is_regression=task.is_regression))

    def predict(state, split):
        """(loss or None when unlabelled, predictions, labels) over every example of `split` once."""
        dataset = splits[split]
        # The width of each global batch, in the order loop.eval_batches asks for them (make_batch sees only this
        # host's rows, and the widths must agree between hosts).
        widths = iter([packing.bucket_width(buckets, lengths[split][indices])
                       for indices, _ in data.eval_batches(len(dataset), eval_batch)])

        def make_batch(indices, _):
            return gather(dataset, indices, next(widths), tokenizer.pad_token_id, task.is_regression)

        # Dispatched batch after batch; read back once at the end, so the host never waits for the devices.
        outputs = [(p_eval_step(state, batch), n_real) for batch, n_real in
                   loop.eval_batches(make_batch, len(dataset), mesh, eval_batch, training_args.seed)]
        outputs = [(parallel.fetch(out), n_real) for out, n_real in outputs]
        loss, weight = (sum(float(out[k]) for out, _ in outputs) for k in ("loss", "weight"))
        logits = np.concatenate([out["logits"][:n_real] for out, n_real in outputs])
        predictions = logits[:, 0] if task.is_regression else logits.argmax(-1)
        return (loss / weight if weight else None), predictions, np.asarray(dataset["labels"][:])

    def run_eval(state) -> dict:
        metrics = {}
        for split, prefix in evals.items():
            loss, predictions, labels = predict(state, split)
            metrics.update({f"{prefix}_loss": loss, **{f"{prefix}_{k}": v for k, v in
                                                       compute_metrics(task, predictions, labels).items()}})
        return metrics

    eval_metrics = None
    if training_args.do_train:
        rows = parallel.host_rows(mesh, update_batch)
        batches = (gather(splits["train"], indices[rows], packing.bucket_width(buckets, lengths["train"][indices]),
                          tokenizer.pad_token_id, task.is_regression)
                   for _, _, indices in data.epoch_batches(train_examples, update_batch, training_args.seed,
                                                           job.start_step, job.total_steps))
        outcome = job.train(state, functools.partial(train_step, is_regression=task.is_regression), batches,
                            tokens_per_step=int(update_batch * lengths["train"].mean()),  # real tokens, not padding
                            evaluate=run_eval, best_metric=f"eval_{task.main_metric}")
        state, eval_metrics = outcome.state, outcome.eval_metrics
        if outcome.trained:
            job.write_results("train", {**outcome.train_metrics, "train_samples": train_examples})
    elif training_args.do_eval:
        eval_metrics = job.phases.timed("evaluate", run_eval)(state)
    if eval_metrics:
        job.write_results("eval", {**eval_metrics, "eval_samples": sum(len(splits[s]) for s in evals)})

    if training_args.do_predict:
        test_metrics = {}
        for split, name in tests.items():
            with job.phases.within("predict"):
                loss, predictions, labels = predict(state, split)
            write_predictions(training_args.output_dir, name, predictions, task)
            if loss is not None:  # the test data has labels
                prefix = "test" if split in ("test", "test_matched") else "test_mm"
                test_metrics.update({f"{prefix}_loss": loss, **{f"{prefix}_{k}": v for k, v in
                                                                compute_metrics(task, predictions, labels).items()}})
        if test_metrics:
            job.write_results("test", {**test_metrics, "test_samples": sum(len(splits[s]) for s in tests)})
    job.finish()


def write_predictions(output_dir: str, name: str, predictions, task: Task):
    """predict_results_<task>.txt (predict_results.txt for your own data): index, then the label name (or the
    score for regression), one line per example in input order."""
    if jax.process_index() != 0:
        return
    path = storage.join(output_dir, f"predict_results_{name}.txt" if name else "predict_results.txt")
    lines = (f"{i}\t{p:.3f}\n" if task.is_regression else f"{i}\t{task.labels[p]}\n" for i, p in enumerate(predictions))
    storage.write_text(path, "index\tprediction\n" + "".join(lines))
    logger.info("Predictions: %s", path)


if __name__ == "__main__":
    exits.run(main)
