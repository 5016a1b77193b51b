"""generate_seq2seq.generate against transformers' generate on tiny T5 and BART checkpoints: greedy and beam search
with length penalties, early stopping, n-gram blocking, forced BOS/EOS, padded inputs and rows that end early, token
for token; and under jit(shard_map) on 8 devices as on one. (tests/test_parity_quirks.py and tests/test_bart.py test
plain greedy search.)"""

import functools
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain import generate, generate_seq2seq, hf_io, models  # noqa: E402

VOCAB, STEPS = 24, 12  # a small vocabulary: end-of-sequence is then a likely candidate, and n-grams repeat
# Tiny configs whose end-of-sequence token wins often enough that beams finish at many lengths (see `checkpoint`).
CONFIGS = {
    "t5": dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=12, feed_forward_proj="gated-gelu",
               tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    "bart": dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=32,
                 init_std=0.3, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
}
FORCED_BOS = {"t5": 5, "bart": 0}  # BART's configs force its bos token first


def cases(family):
    """{name: generate settings}. Each compiled shape costs seconds and the settings of one shape share it (only
    num_beams and no_repeat_ngram_size change shapes): T5 runs four shapes, BART two, shaped as its summarization
    recipes (bart-large-cnn: 4 beams, no_repeat_ngram_size 3, forced BOS/EOS, length_penalty 2, early stopping).
    Plain greedy search is in tests/test_parity_quirks.py and tests/test_bart.py."""
    forced = dict(forced_bos_token_id=FORCED_BOS[family], forced_eos_token_id=CONFIGS[family]["eos_token_id"])
    if family == "t5":
        greedy = dict(num_beams=1, no_repeat_ngram_size=2)
        beams = dict(num_beams=4)
        extra = {"greedy_no_repeat_2": greedy, "greedy_no_repeat_2_forced": dict(greedy, **forced),
                 "beams_2": dict(num_beams=2), "beams_4_no_repeat_2_forced": dict(beams, no_repeat_ngram_size=2,
                                                                                  **forced)}
    else:
        beams = dict(num_beams=4, no_repeat_ngram_size=3)
        extra = {"greedy": dict(num_beams=1), "greedy_forced": dict(num_beams=1, **forced),
                 "cnn": dict(beams, length_penalty=2.0, early_stopping=True, **forced)}
    return {**extra, "beams_4": beams, "length_penalty_0.5": dict(beams, length_penalty=0.5),
            "length_penalty_2": dict(beams, length_penalty=2.0), "early_stopping": dict(beams, early_stopping=True),
            "never_length_penalty_2": dict(beams, early_stopping="never", length_penalty=2.0),
            "beams_4_forced": dict(beams, **forced)}


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("checkpoints"))


@functools.cache
def checkpoint(family, tmp_root):
    """(PyTorch reference in eval mode, our model, our params loaded from its checkpoint, checkpoint path). A random
    tiny model rarely ends a sequence: its end-of-sequence logit is raised (T5: that row of the untied head scaled;
    BART: final_logits_bias), so that rows end at different lengths."""
    if family == "bart":
        pytest.importorskip("flaxtrain.models.bart")
    hf_config = transformers.AutoConfig.for_model(family, **CONFIGS[family])
    torch.manual_seed(0)
    reference = transformers.AutoModelForSeq2SeqLM.from_config(hf_config).eval()
    eos = hf_config.eos_token_id
    with torch.no_grad():
        if family == "t5":  # transformers 5 ties a fresh v1.1 head to `shared`; a trained one is not
            reference.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
            reference.lm_head.weight[eos] *= 1.6
        else:
            reference.final_logits_bias[0, eos] = 2.0
    path = os.path.join(tmp_root, family)
    reference.save_pretrained(path)
    family_module, model = models.create(hf_config, "Seq2SeqLM")
    shapes = jax.eval_shape(functools.partial(family_module.init_params, model), jax.random.key(0))
    return reference, model, hf_io.load_pretrained(path, shapes, model_type=family), path


def inputs(family):
    """[8, 7] encoder ids: row 1 right-padded, row 2 left-padded, row 5 a single token."""
    rng = np.random.default_rng(0)
    ids, mask = rng.integers(4, VOCAB, (8, 7)), np.ones((8, 7), np.int64)
    mask[1, 4:], mask[2, :3], mask[5, 1:] = 0, 0, 0
    return np.where(mask == 1, ids, CONFIGS[family]["pad_token_id"]), mask


def transformers_generate(reference, family, settings):
    """transformers' tokens in our layout: without the start token, pad after the end, STEPS long."""
    cfg = CONFIGS[family]
    ids, mask = inputs(family)
    options = {**dict(length_penalty=1.0, early_stopping=False, no_repeat_ngram_size=0, forced_bos_token_id=None,
                      forced_eos_token_id=None), **settings}
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=STEPS, eos_token_id=cfg["eos_token_id"],
                                 pad_token_id=cfg["pad_token_id"], decoder_start_token_id=cfg["decoder_start_token_id"],
                                 **options).numpy()
    assert (out[:, 0] == cfg["decoder_start_token_id"]).all()
    out = out[:, 1:]
    # Beam search fills after the end with pad_token_id or else eos (T5's pad id 0 is falsy there); it stops once
    # every row has ended.
    ended = np.cumsum(out == cfg["eos_token_id"], axis=1) - (out == cfg["eos_token_id"]) > 0
    out = np.where(ended, cfg["pad_token_id"], out)
    return np.pad(out, ((0, 0), (0, STEPS - out.shape[1])), constant_values=cfg["pad_token_id"])


def ours(family, tmp_root, settings):
    _, model, params, _ = checkpoint(family, tmp_root)
    return np.asarray(generate_seq2seq.generate(model, params, *inputs(family), max_new_tokens=STEPS, **settings))


def test_unrolled_steps_equal_the_scan(tmp_root):
    """BART in the decoding loop's per-layer layout (generate.unroll_layers: layers unrolled on their own weights and
    buffers, cross-attention keys and values keys last) computes what the scanned layers compute: logits and the
    self-attention cache of two steps after the first."""
    _, model, params, _ = checkpoint("bart", tmp_root)
    ids, mask = inputs("bart")
    decode = jax.jit(functools.partial(model.apply, method=model.decode))
    hidden = model.apply({"params": params}, ids, mask, method=model.encode)
    _, cache = decode({"params": params}, np.full((8, 1), 2), hidden, mask, cache=model.init_cache(8, 5))
    split_params, split_cache = generate.unroll_layers(model, params, cache)
    assert split_cache["cross"][1]["key"].shape == (8, 4, 8, 7)  # [B, N, H, S]
    for token in (5, 9):
        expected, cache = decode({"params": params}, np.full((8, 1), token), None, mask, cache=cache)
        got, split_cache = decode({"params": split_params}, np.full((8, 1), token), None, mask, cache=split_cache)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.stack([layer["value"] for layer in split_cache["self"]]), cache["self"]["value"],
                               atol=1e-6)


@pytest.mark.parametrize("family,name", [(f, n) for f in CONFIGS for n in cases(f)])
def test_generate_matches_transformers(family, name, tmp_root):
    settings = cases(family)[name]
    reference = checkpoint(family, tmp_root)[0]
    expected = transformers_generate(reference, family, settings)
    np.testing.assert_array_equal(ours(family, tmp_root, settings), expected)


def repeats_an_ngram(tokens, n):
    ngrams = list(zip(*(tokens[k:] for k in range(n))))
    return len(set(ngrams)) < len(ngrams)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_settings_are_exercised(family, tmp_root):
    """The equality above is not vacuous: with 4 beams, best hypotheses end before max length in some rows and run
    to it in others; the length penalty changes which finished hypothesis wins; forced tokens sit at both ends;
    n-gram blocking changes tokens and leaves no n-gram twice (the start token included)."""
    cfg = CONFIGS[family]
    out = {name: ours(family, tmp_root, settings) for name, settings in cases(family).items()}
    ends = [np.flatnonzero(row == cfg["eos_token_id"]) for row in out["beams_4"]]
    assert any(len(e) and e[0] < STEPS - 1 for e in ends) and any(not len(e) for e in ends)
    assert (out["length_penalty_0.5"] != out["length_penalty_2"]).any()
    forced = out["beams_4_forced"]
    assert (forced[:, 0] == FORCED_BOS[family]).all() and (forced == cfg["eos_token_id"]).any(axis=1).all()
    for name, settings in cases(family).items():
        n = settings.get("no_repeat_ngram_size", 0)
        for row in out[name] if n else ():
            assert not repeats_an_ngram([cfg["decoder_start_token_id"], *row[row != cfg["pad_token_id"]]], n), name
    if family == "t5":  # the same settings without blocking repeat bigrams
        assert any(repeats_an_ngram([0, *row[row != 0]], 2) for row in forced)
        assert (forced != out["beams_4_no_repeat_2_forced"]).any()


SHARDED = """
import functools, json, sys
import jax, numpy as np, transformers
from flaxtrain import generate_seq2seq, hf_io, models, parallel

path, ids, mask, settings = json.loads(sys.argv[1])
hf_config = transformers.AutoConfig.from_pretrained(path)
family, model = models.create(hf_config, "Seq2SeqLM")
shapes = jax.eval_shape(functools.partial(family.init_params, model), jax.random.key(0))
params = hf_io.load_pretrained(path, shapes, model_type=hf_config.model_type)
mesh = parallel.make_mesh(fsdp=4, tensor_parallel=2)
boxed = jax.eval_shape(functools.partial(family.init_params, model, unbox=False), jax.random.key(0))
shardings = parallel.shardings(boxed, mesh, parallel.RULES)
rows = parallel.batch_sharding(mesh)
run = jax.jit(lambda p, i, m: generate_seq2seq.generate(model, p, i, m, **settings),
              in_shardings=(shardings, rows, rows), out_shardings=parallel.replicated(mesh))
with jax.set_mesh(mesh):
    tokens = run(jax.device_put(params, shardings), np.array(ids, np.int32), np.array(mask, np.int32))
print(json.dumps(np.asarray(tokens).tolist()))
"""


def test_beam_search_with_split_params_on_8_devices(tmp_root):
    """Compiled for 8 simulated CPU devices with the params split (--fsdp 4 --tensor_parallel 2) and the rows over
    the batch axes, beam search gives the single-device tokens (which the tests above hold to transformers')."""
    settings = cases("t5")["beams_4_no_repeat_2_forced"]
    ids, mask = inputs("t5")
    path = checkpoint("t5", tmp_root)[3]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=root)
    argument = json.dumps([path, ids.tolist(), mask.tolist(), dict(settings, max_new_tokens=STEPS)])
    done = subprocess.run([sys.executable, "-c", SHARDED, argument], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
    np.testing.assert_array_equal(sharded, ours("t5", tmp_root, settings))
