#!/usr/bin/env python3
"""Summarization: fine-tune an encoder-decoder (BART, mBART, T5, mT5, LongT5, Pegasus, Marian, Blenderbot) with JAX
on TPUs, GPUs or CPUs, watch ROUGE, and write summaries of a test set.

    python run_summarization_flax.py --output_dir=./bart-xsum --model_name_or_path=facebook/bart-base \
        --dataset_name=EdinburghNLP/xsum --do_train --do_eval --do_predict --predict_with_generate \
        --max_source_length=512 --max_target_length=64 --per_device_train_batch_size=64 \
        --per_device_eval_batch_size=64 --learning_rate=5e-5 --warmup_steps=0 --num_train_epochs=6 \
        --logging_steps=100 --eval_steps=1000 --save_steps=1000 --overwrite_output_dir

Documents are truncated to --max_source_length, summaries to --max_target_length (evaluation and test:
--val_max_target_length). A batch's documents are padded to the smallest of a few widths fitted to the data that
fits its longest, its summaries to the longest summary's, and training takes examples of similar length together
(evaluation and prediction: in order of length, the summaries written back in the data's order), so that little of
a step is padding and only a few shapes are compiled. --pad_to_max_length pads every batch to the maximum lengths,
as the original script did (one shape, batches in random order). Run the same command again to resume.
"""

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flaxtrain import (data, exits, generate_seq2seq, lifecycle, loop, packing, parallel, pretrained,
                       seq2seq_batches, storage, training)
from flaxtrain.args import DataArguments, ModelArguments, TrainingArguments, parse_args

logger = logging.getLogger("run_summarization_flax")

# The original's table: (text column, summary column) of well-known datasets, looked up by the last part of
# --dataset_name (so "EdinburghNLP/xsum" finds xsum). Other data: the first and the second column.
SUMMARIZATION_NAME_MAPPING = {
    "amazon_reviews_multi": ("review_body", "review_title"),
    "big_patent": ("description", "abstract"),
    "cnn_dailymail": ("article", "highlights"),
    "orange_sum": ("text", "summary"),
    "pn_summary": ("article", "summary"),
    "psc": ("extract_text", "summary_text"),
    "samsum": ("dialogue", "summary"),
    "thaisum": ("body", "summary"),
    "xglue": ("news_body", "news_title"),
    "xsum": ("document", "summary"),
    "wiki_summary": ("article", "highlights"),
}
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# ----------------------------------------------------------------------------------------------- arguments
@dataclass
class SummarizationDataArguments(DataArguments):
    MAY_CHANGE: ClassVar[tuple] = ("test_file", "max_predict_samples", "val_max_target_length",
                                   "predict_with_generate", "num_beams", "generation_max_length", "length_penalty",
                                   "no_repeat_ngram_size")  # evaluation and prediction only
    text_column: Optional[str] = field(default=None, metadata={"help": "Column of the documents (default: the "
                                                                       "dataset's known one, else the first)."})
    summary_column: Optional[str] = field(default=None, metadata={"help": "Column of the summaries (default: the "
                                                                          "dataset's known one, else the second)."})
    test_file: Optional[str] = field(default=None, metadata={"help": "--do_predict data: a .csv, .json or .jsonl "
                                                                     "file (the summary column is optional)."})
    max_predict_samples: Optional[int] = field(default=None, metadata={"help": "Keep only this many test examples."})
    source_prefix: Optional[str] = field(default=None, metadata={"help": "Put before every document, e.g. "
                                                                         "'summarize: ' for the original T5s."})
    max_source_length: int = field(default=1024, metadata={"help": "Document tokens (longer ones are truncated)."})
    max_target_length: int = field(default=128, metadata={"help": "Summary tokens in training."})
    val_max_target_length: Optional[int] = field(
        default=None, metadata={"help": "Summary tokens in evaluation and test (default: --max_target_length)."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every batch to the maximum lengths (one compiled shape, batches in "
                                         "random order). Otherwise a batch is padded to the smallest of a few "
                                         "widths fitted to the data that fits it, and examples of similar length go "
                                         "together."})
    predict_with_generate: bool = field(default=False, metadata={"help": "Generate summaries in evaluation and "
                                                                         "report ROUGE (--do_predict always does)."})
    num_beams: int = field(default=1, metadata={"help": "Beams in generation (1: greedy)."})
    generation_max_length: Optional[int] = field(
        default=None, metadata={"help": "Most tokens generated per summary, its end token included (default: "
                                        "--val_max_target_length)."})
    length_penalty: Optional[float] = field(
        default=None, metadata={"help": "Beam search: scores are divided by length**length_penalty (default: the "
                                        "model's generation config, else 1.0)."})
    no_repeat_ngram_size: Optional[int] = field(
        default=None, metadata={"help": "Never repeat an n-gram of this size (default: the model's generation "
                                        "config, else 0: off)."})

    def __post_init__(self):
        super().__post_init__()
        self.val_max_target_length = self.val_max_target_length or self.max_target_length
        self.generation_max_length = self.generation_max_length or self.val_max_target_length
        for name in ("max_source_length", "max_target_length", "val_max_target_length", "generation_max_length",
                     "num_beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")


@dataclass
class Seq2SeqTrainingArguments(TrainingArguments):
    label_smoothing_factor: float = field(default=0.0, metadata={"help": "Label smoothing of the training loss."})

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.label_smoothing_factor < 1.0:
            raise ValueError(f"--label_smoothing_factor must be in [0, 1), got {self.label_smoothing_factor}.")


# ---------------------------------------------------------------------------------------------------- data
def summarization_columns(data_args, raw):
    """(text column, summary column): the flags, else the known dataset's, else the first two columns. Every split
    must have both as string columns, except that a test split may lack the summaries (then it is only
    summarized, not scored). Errors name the columns found."""
    reference = next(raw[split] for split in ("train", "validation", "test") if split in raw)
    columns = filled_columns(reference)
    known = SUMMARIZATION_NAME_MAPPING.get((data_args.dataset_name or "").rstrip("/").rsplit("/", 1)[-1])
    if known is None and len(columns) < 2 and not (data_args.text_column and data_args.summary_column):
        raise ValueError(f"The data has only the column(s) {', '.join(columns)}: summarization needs a document and "
                         "a summary column (name them with --text_column and --summary_column).")
    text = data_args.text_column or (known or columns)[0]
    summary = data_args.summary_column or (known or columns)[1]
    if text == summary:
        raise ValueError(f"--text_column and --summary_column are both {text!r}.")
    logger.info("Summarizing the %r column into the %r column", text, summary)
    for split, dataset in raw.items():
        features = {name: dataset.features[name] for name in filled_columns(dataset)}
        found = ", ".join(f"{name} ({getattr(f, 'dtype', type(f).__name__)})" for name, f in features.items())
        for flag, column in (("text_column", text), ("summary_column", summary)):
            if column not in features:
                if split == "test" and flag == "summary_column":
                    continue  # (load_splits says so)
                raise ValueError(f"--{flag}={column!r} is not a column of the {split} data; its columns are: "
                                 f"{found}.")
            if getattr(features[column], "dtype", None) not in ("string", "large_string"):
                raise ValueError(f"--{flag}={column!r} of the {split} data is not a text column; its columns are: "
                                 f"{found}.")
    return text, summary


def filled_columns(dataset):
    """The columns that hold a value in some row. (Files loaded together share one schema: a json test file without
    summaries gets the training file's summary column, all None.)"""
    return [name for name in dataset.column_names if dataset.data.column(name).null_count < len(dataset)]


def drop_empty(dataset, split, text_column, summary_column, data_args):
    """Training and validation rows whose document or summary is empty (or only whitespace) teach and score
    nothing: they are dropped, with a warning that counts them; all of them empty is an error. (Test rows are all
    kept, so that generated_predictions.txt has a line for every one.)"""
    def filled(examples):
        return [bool(t and t.strip()) and bool(s and s.strip())
                for t, s in zip(examples[text_column], examples[summary_column])]

    kept = dataset.filter(filled, batched=True, num_proc=data_args.preprocessing_num_workers,
                          load_from_cache_file=not data_args.overwrite_cache)
    dropped = len(dataset) - len(kept)
    if dropped == len(dataset):
        raise ValueError(f"Every one of the {len(dataset)} {split} examples has an empty document "
                         f"({text_column!r}) or summary ({summary_column!r}).")
    if dropped:
        logger.warning("Dropped %d of the %d %s examples: their document (%r) or summary (%r) is empty.", dropped,
                       len(dataset), split, text_column, summary_column)
    return kept


def tokenize_fn(tokenizer, text_column, summary_column, prefix, source_length, target_length):
    """A batched map function: prefix + document -> input_ids (at most source_length tokens) and source_length; the
    summary (when `summary_column`) -> labels (at most target_length) and target_length. Not padded: see
    seq2seq_batch."""
    def tokenize(examples):
        ids = tokenizer([prefix + (text or "") for text in examples[text_column]], max_length=source_length,
                        truncation=True)["input_ids"]
        out = {"input_ids": ids, "source_length": [len(x) for x in ids]}
        if summary_column:
            labels = tokenizer(text_target=[s or "" for s in examples[summary_column]], max_length=target_length,
                               truncation=True)["input_ids"]
            out.update(labels=labels, target_length=[len(x) for x in labels])
        return out
    return tokenize


# ------------------------------------------------------------------------------------------------ metrics
def generated_lengths(tokens, eos_token_ids):
    """tokens [N, T] -> int [N]: tokens up to and including the first end token (T where there is none)."""
    ended = np.isin(tokens, eos_token_ids)
    return np.where(ended.any(axis=1), ended.argmax(axis=1) + 1, tokens.shape[1])


def rouge_scores(predictions, references) -> dict:
    """Mean ROUGE-1/2/L/Lsum F-measures x 100 (rounded to 4 places, as the original reported), with stemming.
    rougeLsum reads one sentence per line: both sides are split by pysbd's rules (no data download)."""
    import pysbd
    from rouge_score import rouge_scorer

    segmenter = pysbd.Segmenter(language="en", clean=False)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)

    def lines(text):
        return "\n".join(s.strip() for s in segmenter.segment(text)) if text.strip() else ""

    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(lines(reference), lines(prediction))
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    return {key: round(100 * total / max(len(predictions), 1), 4) for key, total in totals.items()}


# Generation settings that models' configs carry (bart-large-cnn's min_length, Blenderbot's
# encoder_no_repeat_ngram_size, Marian's bad_words_ids) and generate_seq2seq does not implement, with their "off" value.
_UNAPPLIED_GENERATION = {"min_length": 0, "min_new_tokens": 0, "encoder_no_repeat_ngram_size": 0,
                         "bad_words_ids": None, "repetition_penalty": 1.0}


def generation_options(source, data_args, hf_config, eos_token_id):
    """Keyword arguments of generate_seq2seq.generate: the flags, and the model's generation config
    (generation_config.json, else its config.json; source: the job's settings.ModelSource) for what the flags
    leave unset."""
    from transformers import GenerationConfig

    try:
        defaults = GenerationConfig.from_pretrained(pretrained.local_copy(source.name_or_path or source.config_name),
                                                    cache_dir=source.cache_dir, token=source.token,
                                                    revision=source.revision)
    except (OSError, TypeError, ValueError):  # no generation_config.json (or no source: a config from --model_type)
        defaults = GenerationConfig.from_model_config(hf_config)
    options = dict(
        max_new_tokens=data_args.generation_max_length, num_beams=data_args.num_beams,
        length_penalty=(defaults.length_penalty or 1.0 if data_args.length_penalty is None
                        else data_args.length_penalty),
        no_repeat_ngram_size=(defaults.no_repeat_ngram_size or 0 if data_args.no_repeat_ngram_size is None
                              else data_args.no_repeat_ngram_size),
        early_stopping=defaults.early_stopping or False,
        eos_token_id=eos_token_id if defaults.eos_token_id is None else defaults.eos_token_id,
        forced_bos_token_id=defaults.forced_bos_token_id, forced_eos_token_id=defaults.forced_eos_token_id)
    options["eos_token_id"] = tuple(np.atleast_1d(options["eos_token_id"]).tolist())
    unapplied = {name: getattr(defaults, name, None) for name, off in _UNAPPLIED_GENERATION.items()
                 if getattr(defaults, name, None) not in (None, off)}
    if unapplied:
        logger.warning("The model's generation config sets %s, which this script does not apply: summaries may "
                       "differ from what transformers' generate writes.",
                       ", ".join(f"{name}={value}" for name, value in unapplied.items()))
    return options


# --------------------------------------------------------------------------------------------------- steps
def train_step(state, batch, rng, accumulation_steps, label_smoothing):
    """Token-weighted (label-smoothed) loss over every summary token of the global batch."""
    rng = jax.random.fold_in(rng, state.step)
    total_weight = jnp.maximum(batch["weights"].sum(), 1.0)

    def loss_fn(params, micro, rng):
        logits = state.apply_fn({"params": params}, micro["input_ids"], micro["attention_mask"],
                                micro["decoder_input_ids"], deterministic=False, rngs={"dropout": rng})
        loss_sum, _, _ = training.cross_entropy_sums(logits, micro["labels"], micro["weights"], label_smoothing)
        return loss_sum / total_weight, loss_sum

    grads, loss_sum = training.accumulate_gradients(loss_fn, state.params, batch, rng, accumulation_steps)
    return state.apply_gradients(grads=grads), {"loss_sum": loss_sum, "weight": total_weight}


def eval_step(state, batch):
    """Plain cross-entropy (no smoothing), so that eval_loss and eval_perplexity compare across runs."""
    logits = state.apply_fn({"params": state.params}, batch["input_ids"], batch["attention_mask"],
                            batch["decoder_input_ids"])
    loss, correct, weight = training.cross_entropy_sums(logits, batch["labels"], batch["weights"])
    return {"loss": loss, "accuracy": correct, "weight": weight}


def generate_step(params, input_ids, attention_mask, model, options):
    """The summaries' tokens [B, max_new_tokens] of the global batch (compiled for the mesh: each device works on
    its rows)."""
    return generate_seq2seq.generate(model, params, input_ids, attention_mask, **options)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    model_args, data_args, training_args = parse_args(
        (ModelArguments, SummarizationDataArguments, Seq2SeqTrainingArguments), argv)
    if training_args.do_predict and not (data_args.test_file or data_args.dataset_name):
        raise ValueError("--do_predict needs a test set: give --test_file (or a --dataset_name with a test split).")
    with lifecycle.Job(model_args, data_args, training_args, task="summarization") as job:
        run(job, data_args, training_args)


def run(job, data_args, training_args):
    # Cheap checks first: tokenizer, config, lengths.
    tokenizer = job.tokenizer()
    tokenizer.padding_side = "right"  # teacher forcing needs the summary tokens first
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer needs a padding and an end-of-sequence token.")
    hf_config = job.config()
    family, model = job.model(hf_config, tokenizer, "Seq2SeqLM")
    if getattr(model.config, "decoder_start_token_id", None) is None:
        raise ValueError("The model config has no decoder_start_token_id: set it in config.json.")
    if family.max_positions is not None:  # learned positions (BART); T5's relative positions have no limit
        positions = family.max_positions(model.config)
        for name in ("max_source_length", "max_target_length", "val_max_target_length", "generation_max_length"):
            if getattr(data_args, name) > positions:
                raise ValueError(f"--{name}={getattr(data_args, name)} is more than the model's {positions} "
                                 "positions.")
    if hf_config.model_type == "t5" and data_args.source_prefix is None:
        logger.warning("A T5 model without --source_prefix: the T5 checkpoints trained on many tasks (t5-small .. "
                       "t5-11b) expect --source_prefix='summarize: ' (a T5 v1.1 or your own needs none).")
    generating = training_args.do_predict or (training_args.do_eval and data_args.predict_with_generate)
    gen_options = (generation_options(job.model_source, data_args, hf_config, tokenizer.eos_token_id)
                   if generating else {})

    splits, references = load_splits(job.settings.data, data_args, training_args, tokenizer)
    lengths = {split: seq2seq_batches.Lengths.of(dataset) for split, dataset in splits.items()}
    buckets = {split: seq2seq_batches.Buckets.of(
        lengths[split], data_args.max_source_length,
        data_args.max_target_length if split == "train" else data_args.val_max_target_length,
        seq2seq_batches.TRAIN_WIDTHS if split == "train" else seq2seq_batches.EVAL_WIDTHS, data_args.pad_to_max_length)
        for split in splits}
    # labels [B, T] -> decoder_input_ids [B, T]: the start token, then labels[:, :-1].
    shift_right = functools.partial(family.shift_right, decoder_start_token_id=model.config.decoder_start_token_id,
                                    pad_token_id=tokenizer.pad_token_id)

    # The optimizer, the mesh and the train state split over it.
    train_examples = len(splits["train"]) if training_args.do_train else 0
    state = job.prepare(train_examples)
    mesh, update_batch, eval_batch = job.mesh, job.update_batch, job.eval_batch
    p_eval_step = job.layout.eval_step(eval_step)
    p_generate = job.layout.params_step(functools.partial(generate_step, model=model, options=gen_options),
                                        batch_args=2)
    if generating:  # traced now (no compiling, no computing), so that unsupported settings fail before training
        ids = jax.ShapeDtypeStruct((eval_batch, data_args.max_source_length), jnp.int32)
        p_generate.lower(state.params, ids, ids)

    def in_length_order(split):
        """(make_batch(indices, keys) for loop.eval_batches, order): the split's examples taken shortest first, so
        that each batch pads little; position i of the batches is example order[i]. The widths are the global
        batches', in the order loop.eval_batches asks for them (make_batch sees only this host's rows; the padding
        rows of the last batch repeat position 0, the shortest example, which fits any width)."""
        dataset, split_lengths = splits[split], lengths[split]
        order = np.argsort(split_lengths.source, kind="stable")
        widths = iter([buckets[split].widths(split_lengths, order[indices])
                       for indices, _ in data.eval_batches(len(dataset), eval_batch)])

        def make_batch(indices, _):  # this host's rows (nothing here is random: no keys needed)
            return seq2seq_batches.batch(dataset[order[indices].tolist()], next(widths), tokenizer.pad_token_id,
                                         shift_right)
        return make_batch, order

    def summarize(params, split):
        """Token ids [N, generation_max_length] of every example's summary, in the data's order."""
        make_batch, order = in_length_order(split)
        outputs = [(p_generate(params, batch["input_ids"], batch["attention_mask"]), n_real) for batch, n_real in
                   loop.eval_batches(make_batch, len(order), mesh, eval_batch, training_args.seed)]
        tokens = np.concatenate([parallel.fetch(tokens)[:n_real] for tokens, n_real in outputs])
        in_data_order = np.empty_like(tokens)
        in_data_order[order] = tokens
        return in_data_order

    def evaluate(state, split="validation", generate=data_args.predict_with_generate):
        """{"eval_loss", ..., "eval_rouge1", ..., "eval_gen_len"} of a split and its summaries (None if not
        generating). Every example counts once: the last batch is padded with rows of weight zero."""
        metrics, predictions = {}, None
        if lengths[split].target is not None:
            metrics = loop.evaluate(state, p_eval_step, in_length_order(split)[0], len(splits[split]), mesh,
                                    eval_batch, training_args.seed)
        if generate:
            tokens = summarize(state.params, split)
            generated = generated_lengths(tokens, gen_options["eos_token_id"])
            predictions = [tokenizer.decode(row[:n], skip_special_tokens=True).strip()
                           for row, n in zip(tokens, generated)]
            metrics["eval_gen_len"] = float(generated.mean())
            if references[split] is not None:
                metrics.update({f"eval_{k}": v for k, v in rouge_scores(predictions, references[split]).items()})
        return metrics, predictions

    eval_metrics = None
    if training_args.do_train:
        rows, train, train_lengths = parallel.host_rows(mesh, update_batch), splits["train"], lengths["train"]
        steps = (update_batch, training_args.seed, job.start_step, job.total_steps)
        order = (data.epoch_batches(len(train), *steps) if data_args.pad_to_max_length else
                 packing.length_grouped_batches(train_lengths.source, *steps))
        batches = (seq2seq_batches.batch(train[indices[rows].tolist()], buckets["train"].widths(train_lengths, indices),
                                         tokenizer.pad_token_id, shift_right)
                   for _, _, indices in order)
        real_tokens = train_lengths.source.mean() + train_lengths.target.mean()
        outcome = job.train(state, functools.partial(train_step, label_smoothing=training_args.label_smoothing_factor),
                            batches, tokens_per_step=int(update_batch * real_tokens),  # real tokens, not padding
                            evaluate=lambda state: evaluate(state)[0],
                            best_metric="eval_rougeLsum" if data_args.predict_with_generate else "eval_loss")
        state, eval_metrics = outcome.state, outcome.eval_metrics
        if outcome.trained:
            job.write_results("train", {**outcome.train_metrics, "train_samples": train_examples})
    elif training_args.do_eval:
        eval_metrics = job.phases.timed("evaluate", evaluate)(state)[0]
    if eval_metrics:
        job.write_results("eval", {**eval_metrics, "eval_samples": len(splits["validation"])})
    if training_args.do_predict:
        with job.phases.within("predict"):
            test_metrics, predictions = evaluate(state, "test", generate=True)
        test_metrics = {k.replace("eval_", "test_", 1): v for k, v in test_metrics.items()}
        job.write_results("test", {**test_metrics, "test_samples": len(splits["test"])})
        if jax.process_index() == 0:
            storage.write_text(storage.join(training_args.output_dir, "generated_predictions.txt"),
                               "".join(" ".join(p.splitlines()) + "\n" for p in predictions))  # a line an example
    job.finish()


def load_splits(source, data_args, training_args, tokenizer):
    """The tokenized splits this run needs ("train", "validation", "test") and the reference summaries of the
    evaluated ones (None for a test set without summaries). source: the job's settings.DataSource."""
    if not (training_args.do_train or training_args.do_eval):  # prediction alone reads no training data
        source = dataclasses.replace(source, train_file=None, validation_file=None)
    raw = data.load_raw_datasets(source, training_args.do_train, training_args.do_eval,
                                 need_test=training_args.do_predict)
    if training_args.do_predict and "test" not in raw:
        raise ValueError(f"--do_predict: the dataset has no 'test' split (it has {', '.join(raw)}).")
    text_column, summary_column = summarization_columns(data_args, raw)
    prefix = data_args.source_prefix or ""
    splits, references = {}, {}
    for split, wanted, limit in (("train", training_args.do_train, data_args.max_train_samples),
                                 ("validation", training_args.do_eval, data_args.max_eval_samples),
                                 ("test", training_args.do_predict, data_args.max_predict_samples)):
        if not wanted:
            continue
        dataset = raw[split]
        summaries = summary_column if summary_column in filled_columns(dataset) else None
        if split != "test":
            dataset = drop_empty(dataset, split, text_column, summary_column, data_args)
        dataset = data.take(dataset, limit)
        references[split] = [s or "" for s in dataset[summaries]] if summaries and split != "train" else None
        if split == "test" and not any(s.strip() for s in references[split] or ()):
            logger.warning("The test data has no summaries (%r): writing summaries without scoring them.",
                           summary_column)
            summaries = references[split] = None
        target_length = data_args.max_target_length if split == "train" else data_args.val_max_target_length
        splits[split] = dataset.map(
            tokenize_fn(tokenizer, text_column, summaries, prefix, data_args.max_source_length, target_length),
            batched=True, num_proc=data_args.preprocessing_num_workers, remove_columns=dataset.column_names,
            load_from_cache_file=not data_args.overwrite_cache)
    return splits, references


if __name__ == "__main__":
    exits.run(main)
