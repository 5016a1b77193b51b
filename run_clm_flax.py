#!/usr/bin/env python3
"""Causal-language-model training (GPT-2, Llama, Qwen, Gemma, Mistral, Phi-3, GPT-Neo, OPT, BLOOM...: the README's
models table) with JAX on TPUs, GPUs or CPUs.

Pretrain from scratch (tokenizer + config + corpus) or continue training a checkpoint on your own text:

    python run_clm_flax.py --output_dir=./runs --model_type=gpt2 --config_name=./my-gpt2 \
        --tokenizer_name=./my-gpt2 --train_file=corpus.txt --block_size=512 --per_device_train_batch_size=64 \
        --learning_rate=5e-3 --warmup_steps=1000 --adam_beta1=0.9 --adam_beta2=0.98 --weight_decay=0.01 \
        --num_train_epochs=20 --overwrite_output_dir

Documents are tokenized, joined with the end-of-sequence token between them, and cut into blocks of --block_size.
Run the same command again to resume; `--do_predict --prompt "..."` writes continuations to generations.jsonl.
"""

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flaxtrain import data, exits, generate, lifecycle, loop, parallel, storage, streaming, training
from flaxtrain.args import DataArguments, ModelArguments, StreamingArguments, TrainingArguments, parse_args

logger = logging.getLogger("run_clm_flax")


# ----------------------------------------------------------------------------------------------- arguments
@dataclass
class ClmDataArguments(DataArguments, StreamingArguments):
    MAY_CHANGE: ClassVar[tuple] = ("prompt", "prompts_file", "max_new_tokens", "temperature", "top_k", "top_p")
    block_size: Optional[int] = field(
        default=None, metadata={"help": "Tokens per training block (default: min(1024, the model's positions))."}
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks when reading .txt files."})
    prompt: Optional[str] = field(default=None, metadata={"help": "--do_predict: a prompt to continue."})
    prompts_file: Optional[str] = field(default=None, metadata={"help": "--do_predict: prompts, one per line."})
    max_new_tokens: int = field(default=50, metadata={"help": "--do_predict: tokens to generate per prompt."})
    temperature: float = field(default=1.0, metadata={"help": "--do_predict: sampling temperature."})
    top_k: int = field(default=50, metadata={"help": "--do_predict: sample among the k likeliest tokens (0: all)."})
    top_p: float = field(default=1.0, metadata={"help": "--do_predict: nucleus sampling mass."})


# ---------------------------------------------------------------------------------------------------- data
def encode_documents(texts, tokenizer):
    """Each document's token ids, then EOS: joined, they are cut into blocks (here, or by streaming.Blocks)."""
    encoded = tokenizer(texts, return_attention_mask=False, verbose=False)["input_ids"]
    return {"input_ids": [[*ids, tokenizer.eos_token_id] for ids in encoded]}


def blocks_of(tokenizer, column, block_size):
    """A batched map function: documents -> token ids joined by EOS -> blocks of block_size.

    Blocks never straddle two map batches: the tail of each batch of 1000 documents is dropped.
    """
    def encode_and_group(examples):
        flat = [t for ids in encode_documents(examples[column], tokenizer)["input_ids"] for t in ids]
        usable = len(flat) // block_size * block_size
        return {"input_ids": [flat[i:i + block_size] for i in range(0, usable, block_size)]}
    return encode_and_group


def to_batch(ids):
    """This host's [b, T] token blocks -> a batch with next-token weights."""
    ids = np.asarray(ids, np.int32)
    weights = np.ones(ids.shape, np.float32)
    weights[:, 0] = 0  # position 0 is no one's next token
    return {"input_ids": ids, "weights": weights}


# --------------------------------------------------------------------------------------------------- steps
def next_token_sums(logits, batch):
    """(loss sum, correct sum, weight sum) over the weighted targets: the logits at t predict the token at t + 1.
    The labels are shifted to the logits (the last position predicts nothing, weight 0) rather than the logits
    sliced to the labels: a slice of the [B, T, V] logits is a copy (1 GiB a 2048-token row at Llama 3's vocab)."""
    shift = functools.partial(jnp.roll, shift=-1, axis=1)
    return training.cross_entropy_sums(logits, shift(batch["input_ids"]), shift(batch["weights"]).at[:, -1].set(0))


def train_step(state, batch, rng, accumulation_steps):
    """Token-weighted loss over every target token of the global batch."""
    rng = jax.random.fold_in(rng, state.step)
    total_weight = jnp.maximum(batch["weights"][:, 1:].sum(), 1.0)

    def loss_fn(params, micro, rng):
        logits = state.apply_fn({"params": params}, micro["input_ids"], deterministic=False, rngs={"dropout": rng})
        loss_sum, _, _ = next_token_sums(logits, micro)
        return loss_sum / total_weight, loss_sum

    grads, loss_sum = training.accumulate_gradients(loss_fn, state.params, batch, rng, accumulation_steps)
    return state.apply_gradients(grads=grads), {"loss_sum": loss_sum, "weight": total_weight}


def eval_step(state, batch):
    logits = state.apply_fn({"params": state.params}, batch["input_ids"])
    loss, correct, weight = next_token_sums(logits, batch)
    return {"loss": loss, "accuracy": correct, "weight": weight}


def write_generations(path, model, params, mesh, tokenizer, prompts, data_args, seed):
    """Greedy and sampled continuations of each prompt, one JSON line per prompt. Every host runs it (the params
    may be split over them); process 0 writes."""
    tokenizer.padding_side = "left"  # the cache needs every row's last prompt token in the same slot
    encoded = tokenizer(prompts, padding=True, return_tensors="np")
    ids, mask = (parallel.on_every_device(encoded[k].astype(np.int32), mesh) for k in ("input_ids", "attention_mask"))
    options = dict(max_new_tokens=data_args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    greedy = generate.generate(model, params, ids, mask, **options)
    sampled = generate.generate(model, params, ids, mask, do_sample=True, temperature=data_args.temperature,
                                top_k=data_args.top_k, top_p=data_args.top_p, rng=jax.random.key(seed), **options)
    greedy, sampled = parallel.fetch((greedy, sampled))
    if jax.process_index() == 0:
        storage.write_text(path, "".join(
            json.dumps({"prompt": prompt, "greedy": tokenizer.decode(g, skip_special_tokens=True),
                        "sampled": tokenizer.decode(s, skip_special_tokens=True)}) + "\n"
            for prompt, g, s in zip(prompts, greedy, sampled)))


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    model_args, data_args, training_args = parse_args((ModelArguments, ClmDataArguments, TrainingArguments), argv)
    prompts = read_prompts(data_args) if training_args.do_predict else []
    with lifecycle.Job(model_args, data_args, training_args, task="text-generation") as job:
        run(job, data_args, training_args, prompts)


def run(job, data_args, training_args, prompts):
    # Cheap checks first: tokenizer, config, lengths.
    tokenizer = job.tokenizer()
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no end-of-sequence token, which this script puts between documents.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # only prompts are ever padded, and masked
    family, model = job.model(job.config(), tokenizer, "CausalLM")
    model_max = family.max_positions(model.config)
    block_size = data_args.block_size or min(1024, model_max)
    if block_size > model_max:
        raise ValueError(f"--block_size={block_size} is more than the model's {model_max} positions.")

    raw, train_set, eval_blocks = None, None, np.zeros((0, block_size), np.int32)
    if data_args.streaming:  # the files now, their text once the mesh says which share is this host's
        stream = job.stream_files()
    elif training_args.do_train or training_args.do_eval:  # (prediction alone needs no data)
        raw = data.load_raw_datasets(job.settings.data, training_args.do_train, training_args.do_eval,
                                     keep_linebreaks=data_args.keep_linebreaks)
        column = data.text_column(next(iter(raw.values())))
        tokenized = raw.map(blocks_of(tokenizer, column, block_size), batched=True,
                            num_proc=data_args.preprocessing_num_workers,
                            remove_columns=next(iter(raw.values())).column_names,
                            load_from_cache_file=not data_args.overwrite_cache).with_format("numpy")
        if training_args.do_train:
            train_set = data.take(tokenized["train"], data_args.max_train_samples)
            if len(train_set) == 0:
                raise ValueError(f"The train data gives no block of {block_size} tokens: the text is too short. "
                                 "Use more text or a smaller --block_size.")
        if training_args.do_eval:
            eval_blocks = data.take(tokenized["validation"], data_args.max_eval_samples)["input_ids"]
            if len(eval_blocks) == 0:
                raise ValueError(f"The validation data gives no block of {block_size} tokens: the text is too "
                                 "short. Use more text or a smaller --block_size.")

    # The optimizer, the mesh and the train state split over it.
    train_examples = None if data_args.streaming else len(train_set) if training_args.do_train else 0
    state = job.prepare(train_examples)
    mesh, update_batch, eval_batch = job.mesh, job.update_batch, job.eval_batch
    encode = functools.partial(encode_documents, tokenizer=tokenizer)
    stream_options = dict(encode=encode, length=block_size, pad={"input_ids": tokenizer.pad_token_id},
                          keep_linebreaks=data_args.keep_linebreaks)
    if data_args.streaming and training_args.do_eval:  # this host's share of the blocks
        eval_blocks, eval_examples, eval_samples = streaming.evaluation_blocks(
            stream["validation"], mesh, eval_batch, **stream_options, limit=data_args.max_eval_samples)
        eval_blocks = eval_blocks["input_ids"]
    else:
        eval_examples = eval_samples = len(eval_blocks)

    p_eval_step = job.layout.eval_step(eval_step)

    def run_eval(state):
        return loop.evaluate(state, p_eval_step, lambda indices, _: to_batch(eval_blocks[indices]), eval_examples,
                             mesh, eval_batch, training_args.seed, per_host=data_args.streaming)

    eval_metrics = None
    if training_args.do_train:
        rows, input_iterator = parallel.host_rows(mesh, update_batch), None
        if data_args.streaming:
            input_iterator = job.training_stream(stream["train"], **stream_options)
            batches = (to_batch(batch["input_ids"]) for batch in input_iterator)
        else:
            batches = (to_batch(train_set[indices[rows].tolist()]["input_ids"])
                       for _, _, indices in data.epoch_batches(len(train_set), update_batch, training_args.seed,
                                                               job.start_step, job.total_steps))
        outcome = job.train(state, train_step, batches, tokens_per_step=update_batch * block_size,
                            evaluate=run_eval, input_iterator=input_iterator)
        state, eval_metrics = outcome.state, outcome.eval_metrics
        if outcome.trained:
            samples = job.total_steps * update_batch if data_args.streaming else len(train_set)
            job.write_results("train", {**outcome.train_metrics, "train_samples": samples})
    elif training_args.do_eval:
        eval_metrics = run_eval(state)
    if eval_metrics:
        job.write_results("eval", {**eval_metrics, "eval_samples": eval_samples})
    if prompts:
        path = storage.join(training_args.output_dir, "generations.jsonl")
        write_generations(path, model, state.params, mesh, tokenizer, prompts, data_args, training_args.seed)
        logger.info("Wrote continuations of %d prompts to %s", len(prompts), path)
    job.finish()


def read_prompts(data_args):
    prompts = [data_args.prompt] if data_args.prompt else []
    if data_args.prompts_file:
        if not os.path.isfile(data_args.prompts_file):
            raise FileNotFoundError(f"--prompts_file={data_args.prompts_file}: no such file.")
        with open(data_args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("--do_predict needs --prompt or --prompts_file.")
    return prompts


if __name__ == "__main__":
    exits.run(main)
