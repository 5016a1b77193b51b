#!/usr/bin/env python3
"""T5 span-corruption pretraining with JAX on TPUs, GPUs or CPUs.

The classic recipe: train a SentencePiece Unigram tokenizer with T5's sentinels on your corpus
(`python -m flaxtrain.t5_tokenizer corpus.txt --output_dir ./my-t5`), save a t5-small / t5-v1_1-base style config
there, then

    python run_t5_mlm_flax.py --output_dir=./runs --model_type=t5 --config_name=./my-t5 --tokenizer_name=./my-t5 \
        --train_file=corpus.txt --max_seq_length=512 --per_device_train_batch_size=32 --adafactor \
        --learning_rate=0.005 --weight_decay=0.001 --warmup_steps=2000 --overwrite_output_dir --num_train_epochs=10

Run the same command again to resume from the newest checkpoint in output_dir.
"""

import functools
import itertools
import logging
from dataclasses import dataclass, field
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from flaxtrain import data, example_rng, exits, lifecycle, loop, parallel, streaming, training
from flaxtrain.args import DataArguments, ModelArguments, StreamingArguments, TrainingArguments, parse_args
from flaxtrain.models import longt5, t5

logger = logging.getLogger("run_t5_mlm_flax")
# Span corruption is T5's pretraining objective: the T5-like encoder-decoders (other seq2seq families are refused).
MODEL_TYPES = (*t5.T5Config.MODEL_TYPES, *longt5.LongT5Config.MODEL_TYPES)


# ----------------------------------------------------------------------------------------------- arguments
@dataclass
class T5DataArguments(DataArguments, StreamingArguments):
    max_seq_length: int = field(
        default=512, metadata={"help": "Encoder input length after corruption (the raw chunk is longer)."}
    )
    mlm_probability: float = field(
        default=0.15, metadata={"help": "Fraction of tokens corrupted (T5's noise density).",
                                "aliases": ["--noise_density"]}
    )
    mean_noise_span_length: float = field(default=3.0, metadata={"help": "Mean length of a corrupted span."})
    train_ref_file: Optional[str] = field(default=None, metadata={"help": "Unused (kept for compatibility)."})
    validation_ref_file: Optional[str] = field(default=None, metadata={"help": "Unused."})


# ---------------------------------------------------------------------------------------------------- data
# Span corruption, as T5 (Raffel et al. 2020, `random_spans_noise_mask` in t5.data.preprocessors). A raw chunk of
# L tokens loses num_noise of them in num_spans noise spans; the encoder input is the text with each noise span
# replaced by a sentinel, and the target is the noise spans, each after its own sentinel:
#
#     raw      Thank you for inviting me to your party last week          (noise: "for inviting", "week")
#     inputs   Thank you <extra_id_0> me to your party last <extra_id_1> </s>
#     labels   <extra_id_0> for inviting <extra_id_1> week </s>
#
# num_noise and num_spans depend only on L, so every row of a batch has the same corrupted lengths; the lengths
# and the mask come from one formula (`noise_span_counts`) and so always agree (they did not in the original,
# transformers issues #22246, #23248).


def noise_span_counts(length, noise_density, mean_noise_span_length):
    """(num_noise_tokens, num_noise_spans) of a raw chunk of `length` tokens. The noise is round(length *
    noise_density), at least 1 and at most length - 1; the spans are round(min(noise, non-noise) / mean), at least 1
    (the min, from transformers #22938, keeps every noise and non-noise span non-empty)."""
    if not 0 < noise_density < 1:
        raise ValueError(f"noise_density must be between 0 and 1, got {noise_density}.")
    if mean_noise_span_length < 1:
        raise ValueError(f"mean_noise_span_length must be at least 1, got {mean_noise_span_length}.")
    if length < 2:
        raise ValueError(f"A chunk to corrupt needs at least 2 tokens, got {length}.")
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(min(num_noise, length - num_noise) / mean_noise_span_length), 1)
    return num_noise, num_spans


def corrupted_lengths(raw_length, noise_density, mean_noise_span_length):
    """(inputs, targets) lengths, each with its EOS, that span corruption makes of `raw_length` tokens."""
    num_noise, num_spans = noise_span_counts(raw_length, noise_density, mean_noise_span_length)
    return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def compute_input_and_target_lengths(inputs_length, noise_density, mean_noise_span_length):
    """(raw_length, targets_length): the longest raw chunk whose corrupted inputs fit in `inputs_length` tokens.

    The corrupted input length grows by 0, 1 or 2 tokens per raw token, so the longest chunk that fits gives
    exactly `inputs_length` tokens, or `inputs_length - 1` where no chunk gives exactly that many (density 0.5 with
    mean span 1, for one: inputs are then always an odd number of tokens). `span_corrupt` pads that one missing
    token with a pad token at the end, masked out by `attention_mask`. `targets_length` is exact. For the usual
    settings this is the original's result: (568, 114) for 512 tokens, density 0.15, mean span 3.
    """
    if inputs_length < 3:
        raise ValueError(f"inputs_length must be at least 3 (a token, a sentinel and EOS), got {inputs_length}.")

    def fits(raw_length):
        return corrupted_lengths(raw_length, noise_density, mean_noise_span_length)[0] <= inputs_length

    # fits(2) always holds (2 raw tokens give 3 input tokens) and fits() turns False once and for all: bisect.
    low, high = 2, 4
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, corrupted_lengths(low, noise_density, mean_noise_span_length)[1]


def random_spans_noise_mask(length, noise_density, mean_noise_span_length, keys):
    """T5's noise mask: bool [n, length], True on noise, one independent draw per example for keys uint64 [n]
    (flaxtrain.example_rng.keys: a row depends on its key alone).

    The noise and the non-noise tokens are each cut at random into num_spans non-empty spans (see
    `noise_span_counts`), which alternate starting with non-noise, so a mask always ends in noise. Every row has
    exactly num_noise noise tokens in num_spans spans.
    """
    num_noise, num_spans = noise_span_counts(length, noise_density, mean_noise_span_length)

    def random_segments(num_items, stream):  # [n, num_items]: the span (0 .. num_spans-1) of each item, in order
        # A new span starts after num_spans - 1 of the num_items - 1 gaps, a uniformly random choice: the gaps
        # whose uniform draws are the smallest.
        starts = np.zeros((len(keys), num_items), bool)
        if num_spans > 1:
            draws = example_rng.uniform(keys, num_items - 1, stream)
            np.put_along_axis(starts[:, 1:], np.argpartition(draws, num_spans - 2, axis=1)[:, :num_spans - 1],
                              True, axis=1)
        return np.cumsum(starts, axis=1)

    # Key 2k for the tokens of non-noise span k, 2k+1 for noise span k: sorted, they interleave the spans.
    order = np.concatenate([2 * random_segments(length - num_noise, 0), 2 * random_segments(num_noise, 1) + 1],
                           axis=1)
    return np.sort(order, axis=1) % 2 == 1


def sentinel_token_ids(tokenizer, count):
    """int32 [count]: the ids of `<extra_id_0>` .. `<extra_id_{count-1}>`, looked up by token (T5's vocabulary puts
    `<extra_id_0>` last, a tokenizer with added sentinels may not). Raises ValueError if one is missing."""
    vocab = tokenizer.get_vocab()
    missing = [f"<extra_id_{i}>" for i in range(count) if f"<extra_id_{i}>" not in vocab]
    if missing:
        raise ValueError(
            f"The tokenizer {tokenizer.name_or_path!r} lacks {len(missing)} of the {count} sentinel tokens "
            f"<extra_id_0> .. <extra_id_{count - 1}> that span corruption needs here (one per noise span; missing: "
            f"{missing[0]}{' ...' if len(missing) > 1 else ''}). Use a T5 tokenizer, train one with `python -m "
            "flaxtrain.t5_tokenizer --extra_ids N`, or make fewer spans (shorter --max_seq_length, smaller "
            "--mlm_probability or longer --mean_noise_span_length).")
    return np.array([vocab[f"<extra_id_{i}>"] for i in range(count)], np.int32)


def _replace_spans(ids, spans, sentinel_ids):
    """[b, L] -> [b, L']: each run of `spans` becomes one sentinel, the k-th run sentinel_ids[k]; the tokens outside
    the runs are kept. Every row has as many runs and run tokens, so the rows keep one length L'. No token id is
    used as a marker, so any id (the pad token too) may occur in the text."""
    first = spans & ~np.pad(spans, ((0, 0), (1, 0)))[:, :-1]
    span_index = np.cumsum(first, axis=1) - 1
    replaced = np.where(first, sentinel_ids[np.clip(span_index, 0, None)], ids)
    return replaced[~spans | first].reshape(len(ids), -1)


def span_corrupt(input_ids, keys, sentinel_ids, eos_id, pad_id, noise_density, mean_noise_span_length,
                 inputs_length, targets_length, decoder_start_id=None):
    """Span corruption of a host's rows.

    input_ids: int [b, raw_length], the raw chunks of the rows this host builds (see
    `compute_input_and_target_lengths`); keys: uint64 [b], one per row (flaxtrain.example_rng.keys). A row's noise
    mask is a function of its key alone, so it is corrupted the same way however the batch is split over hosts.
    sentinel_ids: int [>= num_spans] from `sentinel_token_ids`. Returns int32 arrays:
      input_ids, attention_mask [b, inputs_length]: the text with sentinels, then EOS; padded at the end where the
          corruption comes out shorter (attention_mask 0 there).
      labels, decoder_input_ids [b, targets_length]: the noise spans after their sentinels, then EOS; the decoder
          input is the labels shifted right after `decoder_start_id` (default: the pad token, as T5's).
      weights float32 [b, targets_length]: 1 on every real target token (EOS included), 0 on padding.
    """
    ids = np.asarray(input_ids)
    raw_length = ids.shape[1]
    num_spans = noise_span_counts(raw_length, noise_density, mean_noise_span_length)[1]
    sentinel_ids = np.asarray(sentinel_ids)
    if len(sentinel_ids) < num_spans:
        raise ValueError(f"Corrupting {raw_length} tokens makes {num_spans} noise spans, but only "
                         f"{len(sentinel_ids)} sentinel ids were given.")
    noise = random_spans_noise_mask(raw_length, noise_density, mean_noise_span_length, keys)

    def finish(parts, length, name):  # [b, n] -> [b, length]: EOS, then padding; and the mask of real tokens
        if parts.shape[1] + 1 > length:
            raise ValueError(f"Chunks of {raw_length} tokens give {parts.shape[1] + 1} {name} tokens, more than "
                             f"{length}: take raw_length from compute_input_and_target_lengths.")
        out = np.full((len(parts), length), pad_id, np.int32)
        out[:, :parts.shape[1]] = parts
        out[:, parts.shape[1]] = eos_id
        return out, (np.arange(length) <= parts.shape[1]).astype(np.int32)[None].repeat(len(parts), 0)

    inputs, attention_mask = finish(_replace_spans(ids, noise, sentinel_ids), inputs_length, "input")
    # The targets are the complement: each non-noise span becomes a sentinel. The mask starts with non-noise, so
    # non-noise span k, like noise span k, gets the k-th sentinel, and the targets start with <extra_id_0>.
    labels, real = finish(_replace_spans(ids, ~noise, sentinel_ids), targets_length, "target")
    return {"input_ids": inputs, "attention_mask": attention_mask, "labels": labels,
            "decoder_input_ids": t5.shift_right(labels, pad_id if decoder_start_id is None else decoder_start_id,
                                                pad_id).astype(np.int32),
            "weights": real.astype(np.float32)}


def group_texts(examples, raw_length):
    """For `datasets.map(batched=True)`: concatenates the tokenized texts (each column, e.g. input_ids) of one map
    batch and cuts them into chunks of `raw_length` tokens; the tail shorter than that is dropped, so chunks never
    straddle two map batches. The `</s>` that the T5 tokenizer appends to every text is kept (as the original did):
    it marks where a document ends, inside a chunk too."""
    joined = {key: list(itertools.chain.from_iterable(values)) for key, values in examples.items()}
    total = len(next(iter(joined.values()), [])) // raw_length * raw_length
    return {key: [tokens[i:i + raw_length] for i in range(0, total, raw_length)] for key, tokens in joined.items()}


def encode_text(texts, tokenizer):
    """Token ids of texts (each with the </s> the T5 tokenizer appends), to be cut into chunks."""
    return {"input_ids": tokenizer(texts, return_attention_mask=False, verbose=False)["input_ids"]}


def in_memory_splits(tokenizer, source, data_args, training_args, raw_length):
    """{"train", "validation"} as needed: chunks of raw_length tokens (cached by datasets, so a rerun does not
    tokenize again), cut to --max_train_samples / --max_eval_samples. source: the job's settings.DataSource."""
    raw = data.load_raw_datasets(source, training_args.do_train, training_args.do_eval)
    column = data.text_column(next(iter(raw.values())))
    tokenized = raw.map(lambda examples: encode_text(examples[column], tokenizer), batched=True,
                        num_proc=data_args.preprocessing_num_workers,
                        remove_columns=next(iter(raw.values())).column_names,
                        load_from_cache_file=not data_args.overwrite_cache)
    chunks = tokenized.map(group_texts, batched=True, fn_kwargs={"raw_length": raw_length},
                           num_proc=data_args.preprocessing_num_workers,
                           load_from_cache_file=not data_args.overwrite_cache).with_format("numpy")
    splits = {}
    for split, wanted, limit in (("train", training_args.do_train, data_args.max_train_samples),
                                 ("validation", training_args.do_eval, data_args.max_eval_samples)):
        if wanted:
            splits[split] = data.take(chunks[split], limit)
            if len(splits[split]) == 0:
                raise ValueError(f"The {split} data gives no chunk of {raw_length} tokens (what --max_seq_length="
                                 f"{data_args.max_seq_length} needs before corruption): use more text or a smaller "
                                 "--max_seq_length.")
    return splits


# --------------------------------------------------------------------------------------------------- steps
def train_step(state, batch, rng, accumulation_steps):
    """Token-weighted loss over every target token of the global batch."""
    rng = jax.random.fold_in(rng, state.step)
    total_weight = jnp.maximum(batch["weights"].sum(), 1.0)

    def loss_fn(params, micro, rng):
        logits = state.apply_fn({"params": params}, micro["input_ids"], micro["attention_mask"],
                                micro["decoder_input_ids"], deterministic=False, rngs={"dropout": rng})
        loss_sum, _, _ = training.cross_entropy_sums(logits, micro["labels"], micro["weights"])
        return loss_sum / total_weight, loss_sum

    grads, loss_sum = training.accumulate_gradients(loss_fn, state.params, batch, rng, accumulation_steps)
    return state.apply_gradients(grads=grads), {"loss_sum": loss_sum, "weight": total_weight}


def eval_step(state, batch):
    logits = state.apply_fn({"params": state.params}, batch["input_ids"], batch["attention_mask"],
                            batch["decoder_input_ids"])
    loss, correct, weight = training.cross_entropy_sums(logits, batch["labels"], batch["weights"])
    return {"loss": loss, "accuracy": correct, "weight": weight}


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    model_args, data_args, training_args = parse_args((ModelArguments, T5DataArguments, TrainingArguments), argv)
    if training_args.do_predict:
        raise ValueError("--do_predict: this script has no prediction step (use --do_train and --do_eval).")
    density, span = data_args.mlm_probability, data_args.mean_noise_span_length
    if not 0 < density < 1:
        raise ValueError(f"--mlm_probability (--noise_density) must be between 0 and 1, got {density}.")
    if span < 1:
        raise ValueError(f"--mean_noise_span_length must be at least 1, got {span}.")
    with lifecycle.Job(model_args, data_args, training_args, task="text2text-generation") as job:
        run(job, data_args, training_args)


def run(job, data_args, training_args):
    if data_args.train_ref_file or data_args.validation_ref_file:
        logger.warning("--train_ref_file / --validation_ref_file are ignored.")
    density, span = data_args.mlm_probability, data_args.mean_noise_span_length
    raw_length, targets_length = compute_input_and_target_lengths(data_args.max_seq_length, density, span)

    # Cheap checks first: tokenizer, config.
    tokenizer = job.tokenizer()
    sentinels = sentinel_token_ids(tokenizer, noise_span_counts(raw_length, density, span)[1])
    hf_config = job.config()
    if hf_config.model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {hf_config.model_type!r} is not supported for this task; supported model types: "
                         f"{', '.join(sorted(MODEL_TYPES))}")
    family, model = job.model(hf_config, tokenizer, "Seq2SeqLM")
    logger.info("Chunks of %d tokens become %d encoder and %d decoder tokens", raw_length, data_args.max_seq_length,
                targets_length)

    splits, stream = {}, {}
    if data_args.streaming:  # the files now, their text once the mesh says which share is this host's
        stream = job.stream_files()
    else:
        splits = in_memory_splits(tokenizer, job.settings.data, data_args, training_args, raw_length)

    # The optimizer, the mesh and the train state split over it.
    train_examples = None if data_args.streaming else len(splits["train"]) if training_args.do_train else 0
    state = job.prepare(train_examples)
    mesh, update_batch, eval_batch = job.mesh, job.update_batch, job.eval_batch
    stream_options = dict(encode=functools.partial(encode_text, tokenizer=tokenizer), length=raw_length,
                          pad={"input_ids": tokenizer.pad_token_id})
    if data_args.streaming and training_args.do_eval:  # this host's share of the chunks, as arrays [n, raw_length]
        splits["validation"], eval_examples, eval_samples = streaming.evaluation_blocks(
            stream["validation"], mesh, eval_batch, **stream_options, limit=data_args.max_eval_samples)
    elif training_args.do_eval:
        eval_examples = eval_samples = len(splits["validation"])

    def corrupt(chunks, keys):
        return span_corrupt(chunks, keys, sentinels, tokenizer.eos_token_id, tokenizer.pad_token_id, density, span,
                            data_args.max_seq_length, targets_length, model.config.decoder_start_token_id)

    def make_batch(dataset, indices, keys):  # this host's rows: their dataset indices and example_rng keys
        return corrupt(dataset["input_ids"][indices] if data_args.streaming else
                       dataset[indices.tolist()]["input_ids"], keys)

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
            # A streamed row's noise depends on (seed, share, step, row) (4: see data.RNG_STREAMS).
            share = parallel.host_share(mesh, update_batch)[0]
            batches = (corrupt(batch["input_ids"],
                               example_rng.keys(training_args.seed, 4, share, step, np.arange(len(rows))))
                       for step, batch in enumerate(input_iterator, job.start_step))
        else:
            # An example's noise depends on (seed, epoch, index) alone (2: see data.RNG_STREAMS), not on the hosts.
            batches = (make_batch(splits["train"], indices[rows],
                                  example_rng.keys(training_args.seed, 2, epoch, indices[rows]))
                       for epoch, _, indices in data.epoch_batches(len(splits["train"]), update_batch,
                                                                   training_args.seed, job.start_step,
                                                                   job.total_steps))
        outcome = job.train(state, train_step, batches,
                            tokens_per_step=update_batch * (data_args.max_seq_length + targets_length),
                            evaluate=run_eval, input_iterator=input_iterator)
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
