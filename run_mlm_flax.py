#!/usr/bin/env python3
"""Masked-language-model pretraining (BERT, RoBERTa, XLM-R, ALBERT, DeBERTa-v3, ModernBERT...: the README's models
table) with JAX on TPUs, GPUs or CPUs. BART and mBART train here as the original did: the conditional-generation
model reads the masked text in its encoder and, shifted right, in its decoder, and predicts the masked tokens
(flaxtrain.models.bart.BartForMaskedLM).

Typical use, RoBERTa from scratch on your own corpus (see the README for training the tokenizer and config):

    python run_mlm_flax.py --output_dir=./runs --model_type=roberta --config_name=./my-model \
        --tokenizer_name=./my-model --train_file=corpus.txt --max_seq_length=128 --weight_decay=0.01 \
        --per_device_train_batch_size=128 --learning_rate=3e-4 --warmup_steps=1000 --num_train_epochs=18 \
        --adam_beta1=0.9 --adam_beta2=0.98 --overwrite_output_dir --pad_to_max_length

Run the same command again to resume from the newest checkpoint in output_dir.
"""

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from flaxtrain import data, example_rng, exits, lifecycle, loop, packing, parallel, streaming, training
from flaxtrain.args import DataArguments, ModelArguments, StreamingArguments, TrainingArguments, parse_args

logger = logging.getLogger("run_mlm_flax")
# Pretraining checkpoints' heads besides the masked-LM one (next-sentence, ALBERT's sentence order) and the pooler.
NOT_MASKED_LM = (r"^cls\.seq_relationship\.", r"^sop_classifier\.",
                 r"^(bert|roberta|roberta_prelayernorm|albert)\.pooler\.")



# ----------------------------------------------------------------------------------------------- arguments
@dataclass
class MlmDataArguments(DataArguments, StreamingArguments):
    max_seq_length: Optional[int] = field(
        default=None, metadata={"help": "Tokens per example after tokenization (default: the model's maximum, "
                                        "at most 512)."}
    )
    line_by_line: bool = field(
        default=False, metadata={"help": "One example per non-empty line instead of packing text into blocks."}
    )
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Kept for compatibility: batches are always padded to max_seq_length, so "
                                         "every step has one compiled shape."}
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "Fraction of tokens to mask."})
    train_ref_file: Optional[str] = field(default=None, metadata={"help": "Unused (whole-word masking refs)."})
    validation_ref_file: Optional[str] = field(default=None, metadata={"help": "Unused."})


# ---------------------------------------------------------------------------------------------------- data
def encode_text(texts, tokenizer):
    """Token ids and special-token masks of texts, to be packed into blocks (here, or by streaming.Blocks)."""
    # verbose=False: long lines are expected here, they are cut into blocks
    return dict(tokenizer(texts, return_special_tokens_mask=True, return_attention_mask=False, verbose=False))


def encode_lines(texts, tokenizer, max_len):
    """--line_by_line: each non-blank line, at most max_len tokens, an example of its own."""
    lines = [line for line in texts if line and not line.isspace()]
    # The tokenizer fails on an empty list; a batch of blank lines gives empty columns, the same ones.
    encoded = tokenizer(lines or [""], truncation=True, max_length=max_len, return_special_tokens_mask=True,
                        return_attention_mask=False)
    return {key: values[:len(lines)] for key, values in encoded.items()}


def tokenize(raw, tokenizer, data_args, max_len):
    """Tokenizes every split: one example per line (--line_by_line), or text packed into max_len blocks."""
    column = data.text_column(next(iter(raw.values())))
    common = dict(batched=True, num_proc=data_args.preprocessing_num_workers,
                  load_from_cache_file=not data_args.overwrite_cache)

    if data_args.line_by_line:
        return raw.map(lambda examples: encode_lines(examples[column], tokenizer, max_len),
                       remove_columns=raw["train" if "train" in raw else "validation"].column_names, **common)

    def encode_and_group(examples):
        # Blocks never straddle two map batches: the tail of each batch of 1000 lines is dropped.
        blocks = {}
        for key, seqs in encode_text(examples[column], tokenizer).items():
            flat = [t for seq in seqs for t in seq]
            usable = len(flat) // max_len * max_len
            blocks[key] = [flat[i:i + max_len] for i in range(0, usable, max_len)]
        return blocks

    return raw.map(encode_and_group, remove_columns=next(iter(raw.values())).column_names, **common)


def max_predictions(length: int, probability: float, tail: float = 1e-9) -> int:
    """How many masked tokens per row the loss looks at (BERT's max_predictions_per_seq): the smallest multiple of 8
    that the number of masked tokens, Binomial(length, probability), exceeds with probability under `tail`, so that
    in practice no row ever has more. 48 of 128 at the default 15%."""
    log_pmf = [math.lgamma(length + 1) - math.lgamma(k + 1) - math.lgamma(length - k + 1)
               + k * math.log(probability) + (length - k) * math.log1p(-probability) for k in range(length + 1)]
    count, above = length, 0.0
    while count > 0 and above + math.exp(log_pmf[count]) < tail:
        above += math.exp(log_pmf[count])
        count -= 1
    return min(length, -(-count // 8) * 8)


def mask_tokens(batch, keys, tokenizer, probability, predictions):
    """BERT's 80/10/10 masking of a host's rows.

    batch: {"input_ids", "special_tokens_mask"} [b, T], the rows this host builds (special tokens and padding are
    never masked); keys: uint64 [b], one per row (flaxtrain.example_rng.keys). A row's draws are a function of its
    key alone, so it is masked the same way however the batch is split over hosts. At most `predictions` tokens of
    a row are masked (see max_predictions: the first ones, should a row ever draw more). Returns input_ids,
    attention_mask [b, T], and the masked tokens' positions, labels and weights [b, predictions] (weight 0 on the
    slots after a row's last masked token).
    """
    length = batch["input_ids"].shape[1]
    # One stream per decision, so that each is independent of the others.
    chosen, mask_or_not, random_or_not = (example_rng.uniform(keys, length, stream) for stream in range(3))
    random_ids = example_rng.integers(keys, length, 3, tokenizer.vocab_size)
    ids, special = batch["input_ids"], batch["special_tokens_mask"].astype(bool)
    masked = (chosen < probability) & ~special
    masked &= np.cumsum(masked, axis=1) <= predictions
    to_mask = masked & (mask_or_not < 0.8)
    to_random = masked & ~to_mask & (random_or_not < 0.5)
    inputs = np.where(to_mask, tokenizer.mask_token_id, np.where(to_random, random_ids, ids))
    positions = np.argsort(~masked, axis=1, kind="stable")[:, :predictions]  # the masked ones first, in order
    return {"input_ids": inputs.astype(np.int32), "attention_mask": (ids != tokenizer.pad_token_id).astype(np.int32),
            "positions": positions.astype(np.int32), "labels": np.take_along_axis(ids, positions, 1).astype(np.int32),
            "weights": np.take_along_axis(masked, positions, 1).astype(np.float32)}


def gather(dataset, indices, max_len, pad_id):
    """Rows `indices` of the tokenized dataset as [b, max_len] arrays, padded (special mask 1 on padding)."""
    rows = dataset[indices.tolist()]
    return {"input_ids": packing.padded(rows["input_ids"], max_len, pad_id)[0],
            "special_tokens_mask": packing.padded(rows["special_tokens_mask"], max_len, 1)[0].astype(np.int8)}


def in_memory_splits(tokenizer, source, data_args, training_args, max_len):
    """{"train", "validation"} as needed: tokenized datasets (cached by datasets, so a rerun does not tokenize
    again), cut to --max_train_samples / --max_eval_samples. source: the job's settings.DataSource."""
    raw = data.load_raw_datasets(source, training_args.do_train, training_args.do_eval)
    tokenized = tokenize(raw, tokenizer, data_args, max_len)
    splits = {}
    for split, wanted, limit in (("train", training_args.do_train, data_args.max_train_samples),
                                 ("validation", training_args.do_eval, data_args.max_eval_samples)):
        if wanted:
            splits[split] = data.take(tokenized[split], limit)
            if len(splits[split]) == 0 and data_args.line_by_line:
                path = getattr(data_args, f"{split}_file")
                where = f"--{split}_file={path}" if path else "it"
                raise ValueError(f"The {split} data gives no examples: {where} has no non-blank lines "
                                 "(--line_by_line makes one example of each).")
            if len(splits[split]) == 0:
                raise ValueError(f"The {split} data gives no examples: it is shorter than one block of {max_len} "
                                 "tokens. Use more text, a smaller --max_seq_length or --line_by_line.")
    return splits


# --------------------------------------------------------------------------------------------------- steps
def train_step(state, batch, rng, accumulation_steps):
    """Token-weighted loss over every masked token of the global batch (`batch` is split over the devices; the
    compiled step sums over all of them)."""
    rng = jax.random.fold_in(rng, state.step)
    total_weight = jnp.maximum(batch["weights"].sum(), 1.0)

    def loss_fn(params, micro, rng):
        logits = state.apply_fn({"params": params}, micro["input_ids"], micro["attention_mask"],
                                deterministic=False, positions=micro["positions"], rngs={"dropout": rng})
        loss_sum, _, _ = training.cross_entropy_sums(logits, micro["labels"], micro["weights"])
        return loss_sum / total_weight, loss_sum

    grads, loss_sum = training.accumulate_gradients(loss_fn, state.params, batch, rng, accumulation_steps)
    return state.apply_gradients(grads=grads), {"loss_sum": loss_sum, "weight": total_weight}


def eval_step(state, batch):
    logits = state.apply_fn({"params": state.params}, batch["input_ids"], batch["attention_mask"],
                            positions=batch["positions"])
    loss, correct, weight = training.cross_entropy_sums(logits, batch["labels"], batch["weights"])
    return {"loss": loss, "accuracy": correct, "weight": weight}


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    model_args, data_args, training_args = parse_args((ModelArguments, MlmDataArguments, TrainingArguments), argv)
    if training_args.do_predict:
        raise ValueError("--do_predict: this script has no prediction step (use --do_train and --do_eval).")
    if not 0 < data_args.mlm_probability < 1:
        raise ValueError(f"--mlm_probability must be between 0 and 1, got {data_args.mlm_probability}.")
    with lifecycle.Job(model_args, data_args, training_args, task="fill-mask") as job:
        run(job, data_args, training_args)


def run(job, data_args, training_args):
    if data_args.train_ref_file or data_args.validation_ref_file:
        logger.warning("--train_ref_file / --validation_ref_file are ignored: there is no whole-word masking.")

    # Cheap checks first: tokenizer, config, lengths.
    tokenizer = job.tokenizer()
    if tokenizer.mask_token is None or tokenizer.pad_token is None:
        source = job.model_source
        raise ValueError(f"The tokenizer of {source.tokenizer_name or source.name_or_path} has no "
                         f"{'mask' if tokenizer.mask_token is None else 'padding'} token; masked-LM training needs "
                         "both (RoBERTa's are <mask> and <pad>).")
    family, model = job.model(job.config(), tokenizer, "MaskedLM")
    model_max = family.max_positions(model.config)
    max_len = data_args.max_seq_length or min(model_max, 512)
    if max_len > model_max:
        raise ValueError(f"--max_seq_length={max_len} is more than the model's {model_max} positions.")

    splits, stream = {}, {}
    if data_args.streaming:  # the files now, their text once the mesh says which share is this host's
        stream = job.stream_files()
    else:
        splits = in_memory_splits(tokenizer, job.settings.data, data_args, training_args, max_len)

    # The optimizer, the mesh and the train state split over it. Hub BERT/ALBERT checkpoints also carry a
    # sentence-level head and the pooler, which masked-LM does not use.
    train_examples = None if data_args.streaming else len(splits["train"]) if training_args.do_train else 0
    state = job.prepare(train_examples, drop=NOT_MASKED_LM)
    mesh, update_batch, eval_batch = job.mesh, job.update_batch, job.eval_batch
    predictions = max_predictions(max_len, data_args.mlm_probability)

    encode = (functools.partial(encode_lines, tokenizer=tokenizer, max_len=max_len) if data_args.line_by_line else
              functools.partial(encode_text, tokenizer=tokenizer))
    stream_options = dict(encode=encode, length=max_len, concatenate=not data_args.line_by_line,
                          pad={"input_ids": tokenizer.pad_token_id, "special_tokens_mask": 1})
    if data_args.streaming and training_args.do_eval:  # this host's share of the examples, as arrays [n, max_len]
        splits["validation"], eval_examples, eval_samples = streaming.evaluation_blocks(
            stream["validation"], mesh, eval_batch, **stream_options, limit=data_args.max_eval_samples)
    elif training_args.do_eval:
        eval_examples = eval_samples = len(splits["validation"])

    def mask(rows, keys):
        return mask_tokens(rows, keys, tokenizer, data_args.mlm_probability, predictions)

    def make_batch(dataset, indices, keys):  # this host's rows: their dataset indices and example_rng keys
        if data_args.streaming:
            return mask({k: v[indices] for k, v in dataset.items()}, keys)
        return mask(gather(dataset, indices, max_len, tokenizer.pad_token_id), keys)

    p_eval_step = job.layout.eval_step(eval_step)

    def run_eval(state):
        return loop.evaluate(state, p_eval_step, functools.partial(make_batch, splits["validation"]),
                             eval_examples, mesh, eval_batch, training_args.seed,
                             per_host=data_args.streaming)

    eval_metrics = None
    if training_args.do_train:
        rows, input_iterator = parallel.host_rows(mesh, update_batch), None
        if data_args.streaming:
            input_iterator = job.training_stream(stream["train"], **stream_options)
            # A streamed row's mask depends on (seed, share, step, row) (4: see data.RNG_STREAMS).
            share = parallel.host_share(mesh, update_batch)[0]
            batches = (mask(batch, example_rng.keys(training_args.seed, 4, share, step, np.arange(len(rows))))
                       for step, batch in enumerate(input_iterator, job.start_step))
        else:
            # An example's mask depends on (seed, epoch, index) alone (2: see data.RNG_STREAMS), not on the hosts.
            batches = (make_batch(splits["train"], indices[rows],
                                  example_rng.keys(training_args.seed, 2, epoch, indices[rows]))
                       for epoch, _, indices in data.epoch_batches(len(splits["train"]), update_batch,
                                                                   training_args.seed, job.start_step,
                                                                   job.total_steps))
        outcome = job.train(state, train_step, batches, tokens_per_step=update_batch * max_len, evaluate=run_eval,
                            input_iterator=input_iterator)
        eval_metrics = outcome.eval_metrics
        if outcome.trained:
            samples = job.total_steps * update_batch if data_args.streaming else len(splits["train"])
            job.write_results("train", {**outcome.train_metrics, "train_samples": samples})
    elif training_args.do_eval:
        eval_metrics = job.phases.timed("evaluate", run_eval)(state)
    if eval_metrics:
        job.write_results("eval", {**eval_metrics, "eval_samples": eval_samples})
    job.finish()


if __name__ == "__main__":
    exits.run(main)
