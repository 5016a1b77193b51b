"""The run lifecycle every script shares, in its one valid order:

    with Job(model_args, data_args, training_args, task="fill-mask") as job:  # logging, lock, Hub, resume
        tokenizer = job.tokenizer()
        family, model = job.model(job.config(), tokenizer, "MaskedLM")
        ...the script's data: now it knows how many training examples there are...
        state = job.prepare(train_examples)                                   # plan, mesh, state, record
        ...the script's eval step, batches, metrics...
        outcome = job.train(state, train_step, batches, tokens_per_step=..., evaluate=...)
        job.write_results("train", {...}); job.finish()                      # results, Hub, done

Entering the Job joins the hosts, sets up logging and the compilation cache, reads the flags into values
(flaxtrain/settings.py, the one place that reads them), takes the output_dir's lock (flaxtrain/output_lock.py),
opens the Hub repo (it may download the training state to resume) and decides where the run starts
(flaxtrain/resume.py). Leaving it releases the lock, however the run ends. The methods must be called in the order
above; each says what it needs.
"""

import functools
import logging
from typing import Optional

import jax

from flaxtrain import (compilation_cache, exits, hf_export, hub, loop, models, output_lock, parallel, phases,
                       pretrained, resume, settings, streaming, text_files, training)
from flaxtrain.reporting import setup_logging, write_results

logger = logging.getLogger(__name__)


class Job:
    def __init__(self, model_args, data_args, training_args, *, task: str):
        self._flags, self.task = (model_args, data_args, training_args), task  # task: the Hub pipeline tag
        self.settings: Optional[settings.RunSettings] = None
        self.lock = self.repo = self.start = None
        self.generation_config: Optional[dict] = None  # generation_config.json's settings, where the script has any

    # ------------------------------------------------------------------------------------------ start
    def __enter__(self):
        self.phases = phases.Phases("start-up")  # (see phases.py: the run's phases are this class's steps)
        parallel.initialize_distributed()  # before anything else touches JAX
        setup_logging()
        exits.interrupts_raise()
        self.settings = s = settings.from_flags(*self._flags)
        compilation_cache.use(s.compilation_cache_dir)
        logger.info("%d devices (%d on this host), process %d of %d", jax.device_count(), jax.local_device_count(),
                    jax.process_index(), jax.process_count())
        resume.check_writable(s.output.directory)
        self.lock = output_lock.OutputLock(s.output.directory, s.output.take_over)  # before any work
        try:
            self.repo = hub.connect(s.hub, s.output, s.do_train)  # before resume.start: it may fetch the state
            self.start = resume.start(s.identity, s.output, s.model, do_train=s.do_train)
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc):
        if self.repo is not None and exc[0] is not None:
            self.repo.close()  # (its uploads so far; the final push is finish's)
        self.phases.close()
        self.lock.release()

    @property
    def model_source(self) -> settings.ModelSource:
        """--model_name_or_path and its kin, or the model trained in output_dir (evaluation alone)."""
        return self.start.model

    def tokenizer(self):
        exits.stop_if_interrupted()
        self._tokenizer = pretrained.load_tokenizer(self.model_source)
        return self._tokenizer

    def config(self):
        return pretrained.load_config(self.model_source)

    def model(self, hf_config, tokenizer, head: str):
        """(family, model) with `head`, its vocabulary fitted to `tokenizer` (see pretrained.fit_vocab)."""
        source = self.model_source
        pretrained.fit_vocab(hf_config, tokenizer, from_scratch=not source.name_or_path)
        family, model = models.create(hf_config, head, dtype=pretrained.DTYPES[source.dtype],
                                      gradient_checkpointing=self.settings.gradient_checkpointing)
        self.hf_config, self._tokenizer, self.family, self._model = hf_config, tokenizer, family, model
        self.phases.switch("data")  # what the script does next: read and tokenize
        return family, model

    # --------------------------------------------------------------------------------------- the state
    def prepare(self, train_examples: Optional[int], **load_rules):
        """The optimizer's plan for `train_examples` (None: a stream, --max_steps long), the mesh, and the train
        state split over it: restored from the checkpoint resume.start chose, else initialised (and the weights of
        --model_name_or_path loaded with `load_rules`, see hf_io.load_pretrained). Records this start in
        training_args.json. Returns the state; `mesh`, `layout`, `start_step`, `total_steps` are set."""
        exits.stop_if_interrupted()  # (after tokenizing, which may take hours)
        self.phases.switch("state")
        s, source = self.settings, self.model_source
        self.train_examples = train_examples
        self.steps_per_epoch, self.total_steps, self.schedule, tx = training.plan(
            s.optimization, train_examples, do_train=s.do_train)
        self.layout = loop.layout(self._model, self.family, tx, s.mesh)
        self.mesh = self.layout.mesh
        load = (functools.partial(pretrained.load_weights, source, model_type=self.hf_config.model_type,
                                  **load_rules) if source.name_or_path else None)
        state, self.start_step, self.meta = loop.start_state(self.layout, self.start, train_examples,
                                                             seed=s.cadence.seed, load=load)
        resume.record_start(s.output.directory, self.start_step if s.do_train else None, s.flags, s.identity)
        self.phases.switch("other")
        return state

    # ----------------------------------------------------------------------------------------- --streaming
    def stream_files(self) -> dict:
        """The files of each split this run streams ({"train": ..., "validation": ...}); their text is read once
        the mesh says which share is this host's. Called before `prepare`, so a bad path fails before any work."""
        s, d = self.settings, self.settings.data
        return text_files.files_by_split({"train": d.train_file} if s.do_train else {},
                                         {"validation": d.validation_file} if s.do_eval else {},
                                         dataset_name=d.dataset_name, dataset_config=d.dataset_config,
                                         token=d.token, cache_dir=d.cache_dir)

    def training_stream(self, files, **options):
        """This host's training batches of the stream of `files` (streaming.training_batches with `options`), put
        where the checkpoint this run resumed from left them. A Grain iterator, for `train(input_iterator=...)`."""
        s = self.settings
        return loop.resume_input(self.start, self.start_step, streaming.training_batches(
            files, self.mesh, self.update_batch, **options, shuffle_buffer=s.streaming.shuffle_buffer,
            seed=s.cadence.seed, workers=s.streaming.workers))

    @property
    def update_batch(self) -> int:
        return self.settings.optimization.update_batch

    @property
    def eval_batch(self) -> int:
        return self.settings.eval_batch * jax.device_count()

    # ---------------------------------------------------------------------------------------- training
    def train(self, state, train_step, batches, *, tokens_per_step: int, evaluate=None,
              best_metric: str = "eval_loss", input_iterator=None) -> loop.Outcome:
        """Trains `state` with `train_step(state, batch, rng, accumulation_steps=...)` (compiled here, with the
        state's shardings) on this host's `batches` from start_step on: see loop.train."""
        exits.stop_if_interrupted()
        s = self.settings
        step_fn = self.layout.train_step(functools.partial(train_step,
                                                           accumulation_steps=s.optimization.accumulation_steps))
        plan = loop.Plan(self.start_step, self.total_steps, self.steps_per_epoch, self.schedule, self.update_batch,
                         tokens_per_step)
        evaluate = self.phases.timed("evaluate", evaluate if s.do_eval else None)
        run = loop.Run(s.output, s.cadence, plan, evaluate=evaluate, export=self.phases.timed("export", self.export),
                       meta=self.meta, hub=self.repo, best_metric=best_metric, input_iterator=input_iterator)
        with self.phases.within("train"):
            return loop.train(state, step_fn, batches, plan, run, mesh=self.mesh, seed=s.cadence.seed)

    def export(self, params):
        """The Hugging Face model folder in output_dir: config, weights, tokenizer (every host calls it)."""
        hf_export.save_pretrained(self.settings.output.directory, params, self.hf_config, self._tokenizer,
                                  architecture=self._model.hf_architecture, save_dtype=self.settings.output.save_dtype,
                                  generation_config=self.generation_config)

    # ------------------------------------------------------------------------------------------ the end
    def write_results(self, split: str, metrics: Optional[dict]):
        """{split}_results.json and all_results.json (nothing for None: e.g. a run that had already finished)."""
        if metrics:
            if split != "train":
                logger.info("%s: %s", split.capitalize(), metrics)
            write_results(self.settings.output.directory, split, metrics)

    def finish(self):
        """The model card and the last Hub push (waited for), then where the time went and the last log line."""
        self.phases.switch("finish")
        repo, self.repo = self.repo, None
        hub.finish(repo, self.task, self.settings.flags, self.settings.changed_flags)
        self.phases.report()
        logger.info("Done: the model, tokenizer and results are in %s", self.settings.output.directory)
