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

Instruction and chat fine-tuning (SFT) on json/jsonl/csv/parquet files or a Hub dataset whose columns say the format,
as TRL's SFTTrainer reads them: `prompt` and `completion` (loss on the completion), or `messages` (a conversation
rendered with the tokenizer's chat template, or --chat_template; loss on the assistant turns). Examples are packed
into rows of --block_size that attention never crosses (--packing, on by default), or padded one a row.
`--do_predict --prompts_file chats.jsonl` (a `messages` column) writes the model's replies.

    python run_clm_flax.py --output_dir=./sft --model_name_or_path=Qwen/Qwen2.5-0.5B-Instruct \
        --train_file=chats.jsonl --block_size=2048 --per_device_train_batch_size=8 --learning_rate=2e-5 \
        --num_train_epochs=3 --fsdp=8
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

from flaxtrain import (data, exits, generate, lifecycle, loop, packing, parallel, pretrained, sft_data, storage,
                       streaming, text_files, training)
from flaxtrain.args import DataArguments, ModelArguments, StreamingArguments, TrainingArguments, parse_args

logger = logging.getLogger("run_clm_flax")


# ----------------------------------------------------------------------------------------------- arguments
@dataclass
class ClmDataArguments(DataArguments, StreamingArguments):
    MAY_CHANGE: ClassVar[tuple] = ("prompt", "prompts_file", "max_new_tokens", "temperature", "top_k", "top_p")
    block_size: Optional[int] = field(
        default=None, metadata={"help": "Tokens per training block (default: min(1024, the model's positions))."}
    )
    dataset_format: Optional[str] = field(default=None, metadata={
        "help": "text, prompt_completion or conversational (default: from the columns: text; prompt and "
                "completion; messages)."})
    chat_template: Optional[str] = field(default=None, metadata={
        "help": "A Jinja chat template (a .jinja file or the text) that replaces the tokenizer's; saved with it."})
    completion_only_loss: bool = field(default=True, metadata={
        "help": "prompt_completion: train on the completion's tokens only (false: on the prompt's too)."})
    assistant_only_loss: bool = field(default=True, metadata={
        "help": "conversational: train on the assistant turns only (false: on every token)."})
    packing: Optional[bool] = field(default=None, metadata={
        "help": "SFT formats: several examples a row of --block_size, attending within their own (default: true); "
                "false: one a row, padded to the longest of a length-grouped batch."})
    drop_long_examples: bool = field(default=False, metadata={
        "help": "SFT formats: drop the examples longer than --block_size rather than truncate them."})

    def __post_init__(self):
        super().__post_init__()
        if self.dataset_format is not None and self.dataset_format not in sft_data.FORMATS:
            raise ValueError(f"--dataset_format={self.dataset_format}: use one of {', '.join(sft_data.FORMATS)}.")
        if self.streaming and self.dataset_format not in (None, "text"):
            raise ValueError(f"--streaming reads text only, not --dataset_format={self.dataset_format}.")
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks when reading .txt files."})
    prompt: Optional[str] = field(default=None, metadata={"help": "--do_predict: a prompt to continue."})
    prompts_file: Optional[str] = field(default=None, metadata={
        "help": "--do_predict: prompts, one per line; or a .jsonl file of conversations (`messages`) to answer."})
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


def encode_sft(raw, tokenizer, data_format, block_size, data_args):
    """The SFT formats: each split's examples as input_ids and loss_mask (sft_data), at most block_size tokens (the
    longer truncated or dropped, logged), those with nothing to train left out."""
    for split, examples in raw.items():  # a template or a row that cannot work: one line now, not in a map worker
        if len(examples):
            sft_data.encode_example(tokenizer, examples[0], data_format, data_args.completion_only_loss,
                                    data_args.assistant_only_loss)
    encoded = raw.map(sft_data.sft_encoder(tokenizer, data_format, block_size, data_args.drop_long_examples,
                                           data_args.completion_only_loss, data_args.assistant_only_loss),
                      batched=True, num_proc=data_args.preprocessing_num_workers,
                      remove_columns=next(iter(raw.values())).column_names,
                      load_from_cache_file=not data_args.overwrite_cache)
    for split, examples in encoded.items():
        counts = sft_data.length_counts(examples, block_size)
        if counts["long"]:
            logger.warning("%s: %d of %d examples are longer than --block_size=%d: %s.", split, counts["long"],
                           counts["examples"], block_size,
                           "dropped (--drop_long_examples)" if data_args.drop_long_examples else "truncated")
        if counts["kept"] < counts["examples"]:
            logger.info("%s: %d examples have no token to train on: left out.", split,
                        counts["examples"] - counts["kept"])
    return encoded.filter(lambda n: n > 0, input_columns="num_trained").select_columns(["input_ids", "loss_mask"])


def lengths_of(examples) -> np.ndarray:
    return np.fromiter(map(len, examples["input_ids"]), np.int64, len(examples))


# --------------------------------------------------------------------------------------------------- steps
def next_token_sums(logits, batch):
    """(loss sum, correct sum, weight sum) over the weighted targets: the logits at t predict the token at t + 1.
    The labels are shifted to the logits (the last position predicts nothing, weight 0) rather than the logits
    sliced to the labels: a slice of the [B, T, V] logits is a copy (1 GiB a 2048-token row at Llama 3's vocab)."""
    shift = functools.partial(jnp.roll, shift=-1, axis=1)
    return training.cross_entropy_sums(logits, shift(batch["input_ids"]), shift(batch["weights"]).at[:, -1].set(0))


def chat_generation_settings(source, tokenizer) -> dict:
    """generation_config.json of a fine-tuned chat model: the source model's own (its sampling defaults and stop
    tokens), with EOS and the chat template's end-of-turn token among the stops (eos_token_id: always a list)."""
    base = pretrained.load_generation_settings(source)
    listed = base.get("eos_token_id", [])
    stops = [*dict.fromkeys([*(listed if isinstance(listed, list) else [listed]), *sft_data.stop_token_ids(tokenizer)])]
    return {**base, "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": stops}


def example_inputs(batch) -> dict:
    """The model's inputs beyond the tokens for rows of examples laid out by flaxtrain.packing: their segments
    (attention stays within an example, never on padding) and positions (restarting at each example)."""
    if "segment_ids" not in batch:
        return {}
    return {"segment_ids": batch["segment_ids"], "position_ids": batch["positions"]}


def train_step(state, batch, rng, accumulation_steps):
    """Token-weighted loss over every target token of the global batch (an example's first token and padding are
    no one's target: weight 0, so no prediction crosses from one packed example into the next)."""
    rng = jax.random.fold_in(rng, state.step)
    total_weight = jnp.maximum(batch["weights"][:, 1:].sum(), 1.0)

    def loss_fn(params, micro, rng):
        logits = state.apply_fn({"params": params}, micro["input_ids"], **example_inputs(micro), deterministic=False,
                                rngs={"dropout": rng})
        loss_sum, _, _ = next_token_sums(logits, micro)
        return loss_sum / total_weight, loss_sum

    grads, loss_sum = training.accumulate_gradients(loss_fn, state.params, batch, rng, accumulation_steps)
    return state.apply_gradients(grads=grads), {"loss_sum": loss_sum, "weight": total_weight}


def eval_step(state, batch):
    logits = state.apply_fn({"params": state.params}, batch["input_ids"], **example_inputs(batch))
    loss, correct, weight = next_token_sums(logits, batch)
    return {"loss": loss, "accuracy": correct, "weight": weight}


def write_generations(path, model, params, mesh, tokenizer, prompts, data_args, seed, stop_ids):
    """Greedy and sampled continuations of each prompt, one JSON line per prompt: `prompts` are strings (continued
    as text) or conversations (lists of messages, answered through the chat template, until one of `stop_ids`).
    Every host runs it (the params may be split over them); process 0 writes."""
    chats = bool(prompts) and not isinstance(prompts[0], str)
    ids = ([sft_data.generation_prompt_ids(tokenizer, messages) for messages in prompts] if chats else
           tokenizer(prompts, verbose=False)["input_ids"])
    tokenizer.padding_side = "left"  # the cache needs every row's last prompt token in the same slot
    encoded = tokenizer.pad({"input_ids": ids}, return_tensors="np")
    ids, mask = (parallel.on_every_device(encoded[k].astype(np.int32), mesh) for k in ("input_ids", "attention_mask"))
    options = dict(max_new_tokens=data_args.max_new_tokens, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    greedy = generate.generate(model, params, ids, mask, **options)
    sampled = generate.generate(model, params, ids, mask, do_sample=True, temperature=data_args.temperature,
                                top_k=data_args.top_k, top_p=data_args.top_p, rng=jax.random.key(seed), **options)
    greedy, sampled = parallel.fetch((greedy, sampled))
    if jax.process_index() == 0:
        key = "messages" if chats else "prompt"
        storage.write_text(path, "".join(
            json.dumps({key: prompt, "greedy": tokenizer.decode(g, skip_special_tokens=True),
                        "sampled": tokenizer.decode(s, skip_special_tokens=True)}) + "\n"
            for prompt, g, s in zip(prompts, greedy, sampled)))


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    model_args, data_args, training_args = parse_args((ModelArguments, ClmDataArguments, TrainingArguments), argv)
    prompts = read_prompts(data_args) if training_args.do_predict else []
    with lifecycle.Job(model_args, data_args, training_args, task="text-generation") as job:
        run(job, data_args, training_args, prompts)


def run(job, data_args, training_args, prompts):
    # Cheap checks first: tokenizer, chat template, config, lengths.
    tokenizer = job.tokenizer()
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no end-of-sequence token, which this script puts between documents.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked
    if data_args.chat_template:  # before any tokenization; exported with the tokenizer
        sft_data.set_chat_template(tokenizer, data_args.chat_template)
    chats = bool(prompts) and not isinstance(prompts[0], str)
    if chats:
        sft_data.generation_prompt_ids(tokenizer, prompts[0])  # (no chat template: refused now, not after training)
    family, model = job.model(job.config(), tokenizer, "CausalLM")
    model_max = family.max_positions(model.config)
    block_size = data_args.block_size or min(1024, model_max)
    if block_size > model_max:
        raise ValueError(f"--block_size={block_size} is more than the model's {model_max} positions.")

    raw, data_format, train_set, eval_set = None, "text", None, np.zeros((0, block_size), np.int32)
    if data_args.streaming:  # the files now, their text once the mesh says which share is this host's
        stream = job.stream_files()
        # The first record refuses fine-tuning data here, not later inside an input worker.
        next(iter(text_files.TextRecords(stream["train"][:1] if training_args.do_train else [])), None)
    elif training_args.do_train or training_args.do_eval:  # (prediction alone needs no data)
        raw = data.load_raw_datasets(job.settings.data, training_args.do_train, training_args.do_eval,
                                     keep_linebreaks=data_args.keep_linebreaks)
        data_format = sft_data.detect_format(next(iter(raw.values())).features, data_args.dataset_format)
        if data_format == "text":  # documents joined and cut into blocks
            column = data.text_column(next(iter(raw.values())))
            tokenized = raw.map(blocks_of(tokenizer, column, block_size), batched=True,
                                num_proc=data_args.preprocessing_num_workers,
                                remove_columns=next(iter(raw.values())).column_names,
                                load_from_cache_file=not data_args.overwrite_cache).with_format("numpy")
        else:  # examples with loss masks, packed or padded below
            tokenized = encode_sft(raw, tokenizer, data_format, block_size, data_args)
        too_short = (f"gives no block of {block_size} tokens: the text is too short. Use more text or a smaller "
                     "--block_size." if data_format == "text" else "has no example with a token to train on.")
        if training_args.do_train:
            train_set = data.take(tokenized["train"], data_args.max_train_samples)
            if len(train_set) == 0:
                raise ValueError(f"The train data {too_short}")
        if training_args.do_eval:
            eval_set = data.take(tokenized["validation"], data_args.max_eval_samples)
            if len(eval_set) == 0:
                raise ValueError(f"The validation data {too_short}")
            if data_format == "text":
                eval_set = eval_set["input_ids"]
    examples = data_format != "text"  # rows of whole examples (flaxtrain/packing.py), not blocks of text
    packed = examples and data_args.packing is not False
    stop_ids = [tokenizer.eos_token_id]
    if examples or chats:  # a chat model: its turns end with the template's end-of-turn token, which it learns
        job.generation_config = chat_generation_settings(job.model_source, tokenizer)
        stop_ids = job.generation_config["eos_token_id"]
    plan = packing.plan_packing(lengths_of(train_set), block_size) if packed and training_args.do_train else None
    if plan is not None:
        logger.info("%s: %d examples packed into %d rows of %d tokens, %.1f%% of them real.", data_format,
                    len(train_set), plan.num_rows, block_size, 100 * plan.fill)
        if plan.num_rows < job.update_batch:
            raise ValueError(f"The {len(train_set)} training examples pack into {plan.num_rows} rows of --block_size="
                             f"{block_size}, fewer than one global batch of {job.update_batch} rows: use more data, "
                             "a smaller batch, or --packing=false.")
    elif examples and training_args.do_train:
        logger.info("%s: %d examples, one a row, padded to the bucket of a batch's longest (--packing=false).",
                    data_format, len(train_set))

    # The optimizer, the mesh and the train state split over it.
    train_examples = (None if data_args.streaming else 0 if not training_args.do_train else
                      plan.num_rows if packed else len(train_set))
    state = job.prepare(train_examples)
    mesh, update_batch, eval_batch, pad_id = job.mesh, job.update_batch, job.eval_batch, tokenizer.pad_token_id
    encode = functools.partial(encode_documents, tokenizer=tokenizer)
    stream_options = dict(encode=encode, length=block_size, pad={"input_ids": pad_id},
                          keep_linebreaks=data_args.keep_linebreaks)
    if data_args.streaming and training_args.do_eval:  # this host's share of the blocks
        eval_set, eval_examples, eval_samples = streaming.evaluation_blocks(
            stream["validation"], mesh, eval_batch, **stream_options, limit=data_args.max_eval_samples)
        eval_set = eval_set["input_ids"]
    elif examples and training_args.do_eval:  # packed, whatever training does: the same loss in fewer rows
        eval_plan, eval_samples = packing.plan_packing(lengths_of(eval_set), block_size), len(eval_set)
        eval_examples = eval_plan.num_rows
    else:
        eval_examples = eval_samples = len(eval_set)

    p_eval_step = job.layout.eval_step(eval_step)

    def eval_rows(indices, _):
        if examples:
            return packing.packed_batch(eval_set, eval_plan, indices, pad_id)
        return to_batch(eval_set[indices])

    def run_eval(state):
        return loop.evaluate(state, p_eval_step, eval_rows, eval_examples, mesh, eval_batch, training_args.seed,
                             per_host=data_args.streaming)

    eval_metrics = None
    if training_args.do_train:
        rows, input_iterator, seed = parallel.host_rows(mesh, update_batch), None, training_args.seed
        steps = (job.start_step, job.total_steps)
        tokens_per_step = update_batch * block_size
        if data_args.streaming:
            input_iterator = job.training_stream(stream["train"], **stream_options)
            batches = (to_batch(batch["input_ids"]) for batch in input_iterator)
        elif packed:
            batches = (packing.packed_batch(train_set, plan, indices[rows], pad_id)
                       for _, _, indices in data.epoch_batches(plan.num_rows, update_batch, seed, *steps))
            tokens_per_step = round(plan.real_tokens / plan.num_rows * update_batch)
        elif examples:  # each global batch padded to the bucket of its longest example (the same on every host)
            lengths, buckets = lengths_of(train_set), packing.bucket_lengths(block_size)
            batches = (packing.padded_batch(train_set, indices[rows], packing.bucket_width(buckets, lengths[indices]),
                                            pad_id)
                       for _, _, indices in packing.length_grouped_batches(lengths, update_batch, seed, *steps))
            tokens_per_step = round(lengths.mean() * update_batch)
        else:
            batches = (to_batch(train_set[indices[rows].tolist()]["input_ids"])
                       for _, _, indices in data.epoch_batches(len(train_set), update_batch, seed, *steps))
        outcome = job.train(state, train_step, batches, tokens_per_step=tokens_per_step, evaluate=run_eval,
                            input_iterator=input_iterator)
        state, eval_metrics = outcome.state, outcome.eval_metrics
        if outcome.trained:
            samples = job.total_steps * update_batch if data_args.streaming else len(train_set)
            job.write_results("train", {**outcome.train_metrics, "train_samples": samples})
    elif training_args.do_eval:
        eval_metrics = job.phases.timed("evaluate", run_eval)(state)
    if eval_metrics:
        job.write_results("eval", {**eval_metrics, "eval_samples": eval_samples})
    if prompts:
        path = storage.join(training_args.output_dir, "generations.jsonl")
        with job.phases.within("predict"):
            write_generations(path, model, state.params, mesh, tokenizer, prompts, data_args, training_args.seed,
                              stop_ids)
        logger.info("Wrote the model's %s of %d prompts to %s", "continuations" if isinstance(prompts[0], str)
                    else "replies", len(prompts), path)
    job.finish()


def read_prompts(data_args):
    """--prompt and --prompts_file's lines (text to continue), or a .jsonl --prompts_file's conversations (each
    line's `messages`, to answer)."""
    prompts = [data_args.prompt] if data_args.prompt else []
    if data_args.prompts_file:
        if not os.path.isfile(data_args.prompts_file):
            raise FileNotFoundError(f"--prompts_file={data_args.prompts_file}: no such file.")
        with open(data_args.prompts_file) as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        if data_args.prompts_file.endswith(".jsonl"):
            if prompts:
                raise ValueError("--prompt is text to continue and --prompts_file holds conversations: give one.")
            return [conversation(line, data_args.prompts_file, number) for number, line in enumerate(lines, 1)]
        prompts += lines
    if not prompts:
        raise ValueError("--do_predict needs --prompt or --prompts_file.")
    return prompts


def conversation(line, path, number):
    try:
        messages = json.loads(line)["messages"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"--prompts_file={path}: line {number} is not a JSON object with \"messages\".") from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"--prompts_file={path}: line {number}'s messages are not a list of {{role, content}}.")
    return messages


if __name__ == "__main__":
    exits.run(main)
