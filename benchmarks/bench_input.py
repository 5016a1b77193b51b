#!/usr/bin/env python
"""Times the input pipeline alone (no model, no devices) of the pretraining scripts as host 0 of N hosts: what one
host does per step to build its share of the global batch, so that the per-host work can be seen to fall as 1/N.

    python benchmarks/bench_input.py [--scripts mlm t5 clm] [--hosts 1 2 8 32] [--workers 0 2] [--steps 5]

What is timed, with the scripts' own functions (imported from run_mlm_flax, run_t5_mlm_flax, run_clm_flax):

- in-memory: the tokenized dataset of blocks (an Arrow dataset, as `datasets.map` leaves it); per step the host
  takes its contiguous 1/N of an epoch permutation's global batch (`data.epoch_batches`) and builds its rows: MLM
  `gather` + `mask_tokens` (keys `example_rng.keys(seed, 2, epoch, indices)`), T5 the chunks + `span_corrupt`,
  CLM the blocks + `to_batch`. "in-memory, old" is the per-host cost before the per-example keys
  (flaxtrain/example_rng.py), for MLM and T5: the whole global batch gathered and its random draws made for all B
  rows (copies of the old functions below; CLM gathered only its own rows already).
- streaming: `text_files.TextRecords(files, passes=None, seed=0).shard(0, N)` -> `streaming.host_batches` (window
  shuffle of 10,000 records, the script's tokenizer, packing, batches of B/N rows) in `--workers` Grain worker
  processes (0: one background thread), then the script's collate on each batch in this process. The wait for the
  first batch (start-up: the worker processes import the script, the shuffle window fills, the first batch is
  made) is reported apart; with workers, the batches the others made meanwhile are taken before the steps are
  timed. A step's time is the mean over a run of steps (one tokenizer call makes several small batches at once).

The data is generated: a corpus of English-like text (pseudo-words with Zipf frequencies, lines of 20-200 words) in
`--files` text files, a RoBERTa byte-level BPE, a T5 Unigram and a GPT-2 byte-level BPE tokenizer trained on part
of it, and the in-memory datasets; all cached in --work_dir, so a rerun starts at once. The tokenizers' own speed,
`tokenizer(lines)` 256 lines a call in this one process, with its Rust thread pool and on one thread, is what a
streaming host without worker processes could reach at most.

Seconds per step are medians: in-memory, of the timed steps, with the host counts and old/new interleaved step by
step so that a load that comes and goes on a shared machine hits them alike; streaming, of three runs of steps.
Wall-clock and CPU seconds (this process's and its worker processes', every thread): on a machine shared with other
work the CPU seconds are the steadier measure of a host's work. "x N / N=1" is N times a host's seconds at N hosts
over the seconds at 1 host: 1.00 is perfect 1/N scaling. Tokens are the text tokens of a host's rows (MLM 128, T5
568 raw tokens, CLM 512 a row at the defaults).
"""

import argparse
import functools
import os
import statistics
import sys
import time

import numpy as np
import psutil  # (orbax-checkpoint's dependency) the CPU time of Grain's worker processes

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run_clm_flax  # noqa: E402
import run_mlm_flax  # noqa: E402
import run_t5_mlm_flax  # noqa: E402
from flaxtrain import data, example_rng, streaming, text_files  # noqa: E402
from flaxtrain.models import t5  # noqa: E402

# The README recipes at pod scale: 32 rows a device on 256 devices (bert-base/roberta-base at 128 tokens, t5-base
# at 512 encoder tokens, 568 raw); GPT-2's recipe, 64 rows of 512 tokens a device, on 32 devices (1M tokens a step,
# as MLM's).
RECIPES = {"mlm": dict(global_batch=8192, length=128), "t5": dict(global_batch=8192, length=512),
           "clm": dict(global_batch=2048, length=512)}
DENSITY, SPAN, SEED = 0.15, 3.0, 0
SHUFFLE_BUFFER = 10000
TEXTS_PER_CALL = 256  # as streaming.TEXTS_PER_ENCODE


# ----------------------------------------------------------------------------------------------- the old way
# Kept to measure the change: the per-host masking before flaxtrain/example_rng.py (`git show 55fb363:run_mlm_flax.py`,
# run_t5_mlm_flax.py), which drew the random numbers of all B rows of the global batch on every host.
def old_mask_tokens(batch, rng, rows, tokenizer, probability, predictions):
    shape = batch["input_ids"].shape
    chosen, mask_or_not, random_or_not = rng.random((3,) + shape)[:, rows]
    random_ids = rng.integers(0, tokenizer.vocab_size, shape)[rows]
    ids, special = batch["input_ids"][rows], batch["special_tokens_mask"][rows].astype(bool)
    masked = (chosen < probability) & ~special
    masked &= np.cumsum(masked, axis=1) <= predictions
    to_mask = masked & (mask_or_not < 0.8)
    to_random = masked & ~to_mask & (random_or_not < 0.5)
    inputs = np.where(to_mask, tokenizer.mask_token_id, np.where(to_random, random_ids, ids))
    positions = np.argsort(~masked, axis=1, kind="stable")[:, :predictions]
    return {"input_ids": inputs.astype(np.int32), "attention_mask": (ids != tokenizer.pad_token_id).astype(np.int32),
            "positions": positions.astype(np.int32), "labels": np.take_along_axis(ids, positions, 1).astype(np.int32),
            "weights": np.take_along_axis(masked, positions, 1).astype(np.float32)}


def old_random_spans_noise_mask(length, noise_density, mean_noise_span_length, rng, batch_size):
    num_noise, num_spans = run_t5_mlm_flax.noise_span_counts(length, noise_density, mean_noise_span_length)

    def random_segments(num_items):
        starts = np.zeros((batch_size, num_items), bool)
        starts[:, 1:] = rng.permuted(np.tile(np.arange(num_items - 1) < num_spans - 1, (batch_size, 1)), axis=1)
        return np.cumsum(starts, axis=1)

    keys = np.concatenate([2 * random_segments(length - num_noise), 2 * random_segments(num_noise) + 1], axis=1)
    return np.sort(keys, axis=1) % 2 == 1


def old_span_corrupt(input_ids, rng, rows, sentinel_ids, eos_id, pad_id, noise_density, mean_noise_span_length,
                     inputs_length, targets_length):
    input_ids = np.asarray(input_ids)
    batch, raw_length = input_ids.shape
    noise = old_random_spans_noise_mask(raw_length, noise_density, mean_noise_span_length, rng, batch)[rows]
    ids = input_ids[rows]

    def finish(parts, length):
        out = np.full((len(parts), length), pad_id, np.int32)
        out[:, :parts.shape[1]] = parts
        out[:, parts.shape[1]] = eos_id
        return out, (np.arange(length) <= parts.shape[1]).astype(np.int32)[None].repeat(len(parts), 0)

    inputs, attention_mask = finish(run_t5_mlm_flax._replace_spans(ids, noise, sentinel_ids), inputs_length)
    labels, real = finish(run_t5_mlm_flax._replace_spans(ids, ~noise, sentinel_ids), targets_length)
    return {"input_ids": inputs, "attention_mask": attention_mask, "labels": labels,
            "decoder_input_ids": t5.shift_right(labels, pad_id, pad_id).astype(np.int32),
            "weights": real.astype(np.float32)}


# ---------------------------------------------------------------------------------------------- the data
FUNCTION_WORDS = ("the of and to a in is that for it as was with be by on not he i this are or his from at which "
                  "but have an had they you were their one all we can her has there been if more when will would "
                  "who so no she other its may these what them than some him time into only do").split()


def pseudo_words(count: int, rng) -> list[str]:
    """English-looking words made of syllables, shorter ones first (the frequent ones, as in English)."""
    onsets = "b c d f g h j k l m n p r s t v w y z bl br ch cl cr dr fl fr gl gr pl pr sc sh sl sp st str th tr wh"
    onsets, vowels = onsets.split() + [""] * 4, "a e i o u ea ai ou oo ie".split()
    codas = "n r s t l d m ng st nd ck rt ll ss".split() + [""] * 8
    words, seen = list(FUNCTION_WORDS), set(FUNCTION_WORDS)
    while len(words) < count:
        syllables = 1 + min(int(rng.exponential(0.35 + len(words) / count)), 3)
        word = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def make_corpus(folder: str, megabytes: float, files: int, seed: int = 0) -> list[str]:
    """`files` text files of English-like lines (20-200 words, Zipf-distributed over 30,000 words) totalling about
    `megabytes`; kept in `folder` and reused when already there."""
    paths = [os.path.join(folder, f"part-{i:04d}.txt") for i in range(files)]
    done = os.path.join(folder, "DONE")
    if os.path.exists(done) and open(done).read() == f"{megabytes} {files} {seed}":
        return paths
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = np.array(pseudo_words(30000, rng), object)
    frequency = 1.0 / np.arange(1, len(words) + 1) ** 1.07
    frequency /= frequency.sum()
    capitalized = np.array([w.capitalize() for w in words], object)
    per_file = megabytes * 1e6 / files
    for path in paths:
        with open(path, "w") as f:
            written = 0
            while written < per_file:
                lengths = rng.integers(20, 201, 500)
                ids = rng.choice(len(words), lengths.sum(), p=frequency)
                punctuation = rng.choice(np.array(["", ",", "."], object), len(ids), p=[0.89, 0.05, 0.06])
                tokens = words[ids] + punctuation
                starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
                tokens[starts] = capitalized[ids[starts]]
                text = "".join(" ".join(tokens[s:s + n]).rstrip(",") + ".\n" for s, n in zip(starts, lengths))
                f.write(text)
                written += len(text)
    with open(done, "w") as f:
        f.write(f"{megabytes} {files} {seed}")
    return paths


def make_tokenizers(folder: str, corpus: list[str], vocab_size: int) -> dict:
    """{"mlm": RoBERTa byte-level BPE, "t5": T5 Unigram with 100 sentinels, "clm": GPT-2 byte-level BPE}, trained on
    the first files of the corpus (about 4 MB) as tests/tiny.py makes them, saved in `folder`."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from flaxtrain.t5_tokenizer import train_t5_tokenizer

    sample = corpus[:max(1, int(len(corpus) * 4e6 / sum(os.path.getsize(p) for p in corpus)))]
    paths = {name: os.path.join(folder, f"{name}-{vocab_size}") for name in ("mlm", "t5", "clm")}
    if not os.path.exists(os.path.join(paths["mlm"], "tokenizer.json")):
        bpe = ByteLevelBPETokenizer()
        bpe.train(sample, vocab_size=vocab_size, min_frequency=2,
                  special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
        bpe._tokenizer.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")),
                                                          ("<s>", bpe.token_to_id("<s>")))
        PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                pad_token="<pad>", mask_token="<mask>", model_max_length=512
                                ).save_pretrained(paths["mlm"])
    if not os.path.exists(os.path.join(paths["t5"], "tokenizer.json")):
        train_t5_tokenizer(sample, paths["t5"], vocab_size=vocab_size)
    if not os.path.exists(os.path.join(paths["clm"], "tokenizer.json")):
        bpe = ByteLevelBPETokenizer()
        bpe.train(sample, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                  show_progress=False)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                            eos_token="<|endoftext|>", unk_token="<|endoftext|>")
        tokenizer.pad_token = tokenizer.eos_token  # as run_clm_flax sets it
        tokenizer.save_pretrained(paths["clm"])
    return {name: AutoTokenizer.from_pretrained(path) for name, path in paths.items()}


def read_lines(paths: list[str]) -> list[str]:
    lines = []
    for path in paths:
        with open(path) as f:
            lines.extend(line.rstrip("\n") for line in f)
    return lines


def in_memory_dataset(folder: str, script: str, tokenizer, corpus: list[str], length: int, rows_needed: int):
    """The tokenized training set as the script holds it: an Arrow dataset (memory-mapped from `folder`) of blocks
    of `length` tokens (T5: raw chunks), each script's encoding of the text packed end to end."""
    import datasets

    datasets.disable_progress_bars()
    path = os.path.join(folder, f"{script}-{length}-{len(tokenizer)}")
    if not os.path.exists(os.path.join(path, "dataset_info.json")):
        encode = {"mlm": run_mlm_flax.encode_text, "t5": run_t5_mlm_flax.encode_text,
                  "clm": run_clm_flax.encode_documents}[script]
        columns, lines = {}, read_lines(corpus)
        for begin in range(0, len(lines), 10000):
            for key, seqs in encode(lines[begin:begin + 10000], tokenizer=tokenizer).items():
                columns.setdefault(key, []).append(np.fromiter((t for s in seqs for t in s), np.int32))
        blocks = {}
        for key, parts in columns.items():
            joined = np.concatenate(parts)
            blocks[key] = joined[:len(joined) // length * length].reshape(-1, length)
        datasets.Dataset.from_dict(blocks).save_to_disk(path)
    dataset = datasets.load_from_disk(path)
    if len(dataset) < rows_needed:
        raise SystemExit(f"--corpus_mb: the corpus gives {len(dataset)} {script} blocks of {length} tokens, fewer "
                         f"than a global batch of {rows_needed}: give more megabytes or a smaller --global_batch.")
    return dataset if script == "mlm" else dataset.with_format("numpy")  # as each script formats it


# --------------------------------------------------------------------------------------------- the scripts
class Script:
    """A script's host-side work: `in_memory(dataset, indices, epoch, i, rows)` builds this host's rows of global
    batch i (`old=True`: the old way, every row's draws), `collate(batch, step, share)` a streamed host batch."""

    def __init__(self, name: str, tokenizer, length: int):
        self.name, self.tokenizer, self.length = name, tokenizer, length
        if name == "t5":
            self.raw_length, self.targets_length = run_t5_mlm_flax.compute_input_and_target_lengths(
                length, DENSITY, SPAN)
            self.sentinels = run_t5_mlm_flax.sentinel_token_ids(
                tokenizer, run_t5_mlm_flax.noise_span_counts(self.raw_length, DENSITY, SPAN)[1])
        else:
            self.raw_length = length
        self.predictions = run_mlm_flax.max_predictions(length, DENSITY)
        self.encode = functools.partial({"mlm": run_mlm_flax.encode_text, "t5": run_t5_mlm_flax.encode_text,
                                         "clm": run_clm_flax.encode_documents}[name], tokenizer=tokenizer)
        self.pad = ({"input_ids": tokenizer.pad_token_id, "special_tokens_mask": 1} if name == "mlm" else
                    {"input_ids": tokenizer.pad_token_id})

    def mask(self, rows, keys):
        return run_mlm_flax.mask_tokens(rows, keys, self.tokenizer, DENSITY, self.predictions)

    def corrupt(self, chunks, keys):
        return run_t5_mlm_flax.span_corrupt(chunks, keys, self.sentinels, self.tokenizer.eos_token_id,
                                            self.tokenizer.pad_token_id, DENSITY, SPAN, self.length,
                                            self.targets_length)

    def in_memory(self, dataset, indices, epoch, i, rows, old=False):
        if old:  # all B rows gathered, all B rows' draws made; the host's rows kept
            rng = np.random.default_rng([SEED, 2, epoch, i])
            if self.name == "mlm":
                whole = run_mlm_flax.gather(dataset, indices, self.length, self.tokenizer.pad_token_id)
                return old_mask_tokens(whole, rng, rows, self.tokenizer, DENSITY, self.predictions)
            return old_span_corrupt(dataset[indices.tolist()]["input_ids"], rng, rows, self.sentinels,
                                    self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, DENSITY, SPAN,
                                    self.length, self.targets_length)
        mine = indices[rows]
        keys = example_rng.keys(SEED, 2, epoch, mine)
        if self.name == "mlm":
            return self.mask(run_mlm_flax.gather(dataset, mine, self.length, self.tokenizer.pad_token_id), keys)
        if self.name == "t5":
            return self.corrupt(dataset[mine.tolist()]["input_ids"], keys)
        return run_clm_flax.to_batch(dataset[mine.tolist()]["input_ids"])

    def collate(self, batch, step, share):
        keys = example_rng.keys(SEED, 4, share, step, np.arange(len(batch["input_ids"])))
        if self.name == "mlm":
            return self.mask(batch, keys)
        if self.name == "t5":
            return self.corrupt(batch["input_ids"], keys)
        return run_clm_flax.to_batch(batch["input_ids"])


# -------------------------------------------------------------------------------------------------- timing
def cpu_seconds(processes) -> float:
    """User + system CPU seconds of `processes` (psutil.Process: this one and Grain's workers), all threads."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def time_in_memory(script: Script, dataset, global_batch: int, hosts: list[int], steps: int, old: bool) -> dict:
    """{(N, old?): [(wall, CPU) seconds of each step]} of host 0's rows, every variant once per global batch, in
    turn."""
    variants = [(n, False) for n in hosts] + ([(n, True) for n in hosts] if old else [])
    times = {v: [] for v in variants}
    batches = data.epoch_batches(len(dataset), global_batch, SEED, 0, steps + 1)
    for step, (epoch, i, indices) in enumerate(batches):
        for n, was in variants:
            rows = np.arange(global_batch // n)  # host 0's contiguous 1/N of the global batch
            start, cpu = time.perf_counter(), time.process_time()
            script.in_memory(dataset, indices, epoch, i, rows, old=was)
            if step:  # the first round warms the caches
                times[(n, was)].append((time.perf_counter() - start, time.process_time() - cpu))
    return times


def time_streaming(script: Script, files: list[str], global_batch: int, n: int, workers: int, steps: int,
                   seconds: float) -> tuple[float, float, float]:
    """(seconds to the first batch, wall and CPU seconds per step) of host 0 of n reading its share. A step's
    seconds are the median over three equal runs of steps of their mean: a batch may come ready with others (from
    one tokenizer call, or another worker's buffer), so single steps come in bursts. At least `steps` steps are
    timed, more until `seconds` pass. CPU: this process's (collate; without workers the pipeline's thread and the
    tokenizer's) and the workers'."""
    records = text_files.TextRecords(files, passes=None, seed=SEED).shard(0, n)
    start = time.perf_counter()
    batches = streaming.host_batches(records, script.encode, length=script.raw_length, rows=global_batch // n,
                                     pad=script.pad, shuffle_buffer=SHUFFLE_BUFFER, seed=SEED, workers=workers)
    try:
        script.collate(next(batches), 0, 0)
        first = time.perf_counter() - start
        for step in range(1, workers):  # warm-up: the batches the other workers made meanwhile
            script.collate(next(batches), step, 0)
        me = psutil.Process()
        processes = [me, *me.children(recursive=True)]
        marks = [(time.perf_counter(), cpu_seconds(processes))]
        while len(marks) <= max(steps, 3) or (marks[-1][0] - marks[0][0] < seconds and len(marks) <= 300) or (
                len(marks) - 1) % 3:
            script.collate(next(batches), max(workers, 1) + len(marks) - 1, 0)
            marks.append((time.perf_counter(), cpu_seconds(processes)))
    finally:
        batches.close()
    third = (len(marks) - 1) // 3
    runs = [(marks[k + third][0] - marks[k][0], marks[k + third][1] - marks[k][1]) for k in range(0, 3 * third, third)]
    return first, statistics.median(w for w, _ in runs) / third, statistics.median(c for _, c in runs) / third


def tokenizer_speed(tokenizer, lines: list[str], threads: bool) -> tuple[float, float]:
    """(tokens per second, tokens per CPU second) of tokenizer(256 lines) calls over `lines`, with the Rust thread
    pool or on one thread; medians of three passes."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"
    try:
        tokenizer(lines[:TEXTS_PER_CALL])
        speeds = []
        for _ in range(3):
            tokens, start, cpu = 0, time.perf_counter(), time.process_time()
            for begin in range(0, len(lines), TEXTS_PER_CALL):
                tokens += sum(map(len, tokenizer(lines[begin:begin + TEXTS_PER_CALL])["input_ids"]))
            speeds.append((tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu)))
        return statistics.median(s for s, _ in speeds), statistics.median(c for _, c in speeds)
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--modes", nargs="+", choices=["in-memory", "streaming"], default=["in-memory", "streaming"])
    parser.add_argument("--hosts", nargs="+", type=int, default=[1, 2, 8, 32], help="host counts N")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2], help="streaming worker processes")
    parser.add_argument("--global_batch", type=int, help="global rows (default: the recipe's: MLM and T5 8192, "
                                                         "CLM 2048)")
    parser.add_argument("--length", type=int, help="tokens a row: MLM and CLM blocks, T5 encoder inputs "
                                                   "(default 128, 512, 512)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (in-memory: of every N, in turn; "
                                                              "streaming: at least, in three runs)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="streaming: time more steps until this long has passed")
    parser.add_argument("--no_old", action="store_true", help="skip the old in-memory cost")
    parser.add_argument("--corpus_mb", type=float, default=40.0)
    parser.add_argument("--files", type=int, default=64, help="corpus files (a host reads whole files while there "
                                                               "are at least N; else every N-th line of all)")
    parser.add_argument("--vocab_size", type=int, default=16000)
    parser.add_argument("--work_dir", default="/tmp/bench_input")
    args = parser.parse_args(argv)

    begin = time.perf_counter()
    corpus = make_corpus(os.path.join(args.work_dir, f"corpus-{args.corpus_mb:g}mb-{args.files}"), args.corpus_mb,
                         args.files)
    tokenizers = make_tokenizers(os.path.join(args.work_dir, "tokenizers"), corpus, args.vocab_size)
    print(f"corpus: {args.corpus_mb:g} MB in {args.files} files, tokenizers of {args.vocab_size} pieces, ready in "
          f"{time.perf_counter() - begin:.0f} s ({args.work_dir}); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)

    sample = read_lines(corpus[-2:])  # files the tokenizers were not trained on
    speed = {}
    print("\n| tokenizer | tokens/s, thread pool | tokens/s, one thread | tokens per CPU second, one thread |\n"
          "| --- | --- | --- | --- |")
    for name in args.scripts:
        speed[name] = tokenizer_speed(tokenizers[name], sample, True)[0], *tokenizer_speed(tokenizers[name], sample,
                                                                                            False)
        print(f"| {name} | {speed[name][0]:,.0f} | {speed[name][1]:,.0f} | {speed[name][2]:,.0f} |", flush=True)

    print("\n| script | mode | N | workers | host rows | s/step | CPU s/step | tokens/s per host | x N / N=1 (wall, "
          "CPU) | % of tokenizer (wall, CPU) | first batch s |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)

    def row(script, mode, n, workers, seconds, cpu, base, first=None):
        rows = global_batch // n
        tokens = rows * script.raw_length
        percent = (f"{100 * tokens / seconds / speed[script.name][0]:.0f}, "
                   f"{100 * tokens / cpu / speed[script.name][2]:.0f}") if mode == "streaming" else ""
        print(f"| {script.name} | {mode} | {n} | {workers} | {rows} | {seconds:.4f} | {cpu:.4f} | "
              f"{tokens / seconds:,.0f} | {seconds * n / base[0]:.2f}, {cpu * n / base[1]:.2f} | {percent} | "
              f"{'' if first is None else f'{first:.1f}'} |", flush=True)

    for name in args.scripts:
        recipe = RECIPES[name]
        global_batch, length = args.global_batch or recipe["global_batch"], args.length or recipe["length"]
        script = Script(name, tokenizers[name], length)
        if "in-memory" in args.modes:
            dataset = in_memory_dataset(os.path.join(args.work_dir, "datasets"), name, tokenizers[name], corpus,
                                        script.raw_length, global_batch)
            old = name != "clm" and not args.no_old  # CLM gathered only the host's rows already
            times = time_in_memory(script, dataset, global_batch, args.hosts, args.steps, old)
            for was in (False, True) if old else (False,):
                medians = {n: (statistics.median(w for w, _ in times[(n, was)]),
                               statistics.median(c for _, c in times[(n, was)])) for n in args.hosts}
                base = tuple(x * args.hosts[0] for x in medians[args.hosts[0]])
                for n in args.hosts:
                    row(script, "in-memory, old" if was else "in-memory", n, "", *medians[n], base)
        if "streaming" in args.modes:
            for workers in args.workers:
                base = None
                for n in args.hosts:
                    first, seconds, cpu = time_streaming(script, corpus, global_batch, n, workers, args.steps,
                                                         args.seconds)
                    base = base or (seconds * n, cpu * n)
                    row(script, "streaming", n, workers, seconds, cpu, base, first)
    print(f"\n{time.perf_counter() - begin:.0f} s in all; load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
