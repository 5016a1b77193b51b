"""The BART-like variants (Pegasus, Marian, Blenderbot, BlenderbotSmall) against transformers' PyTorch models: logits
on padded batches from their checkpoints, our checkpoints loading in PyTorch with nothing missing or unexpected,
greedy and 4-beam generation token for token, the sinusoidal tables, full-size parameter counts and config checks."""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain import generate_seq2seq, hf_io, models  # noqa: E402
from flaxtrain.models import blenderbot, marian, pegasus  # noqa: E402
from tests.parity import (assert_close, jit, key, param_count, param_shapes, round_trip, seq2seq_inputs,  # noqa: E402
                          torch_param_count, torch_seq2seq_logits)
from tests.test_bart_parity import randomize_  # noqa: E402

# Each as its checkpoints are (activation, scaled embeddings); the same special ids for all (pad 1, eos 2).
VARIANTS = {"pegasus": dict(activation_function="relu", scale_embedding=True),
            "marian": dict(activation_function="swish", scale_embedding=True),
            "blenderbot": dict(activation_function="gelu", scale_embedding=True),
            "blenderbot-small": dict(activation_function="gelu", scale_embedding=True)}
FAMILIES = {"pegasus": pegasus.FAMILY, "marian": marian.FAMILY, "blenderbot": blenderbot.FAMILY,
            "blenderbot-small": blenderbot.FAMILY}
STEPS = 8


def hf_config(model_type):
    """Tiny, with fewer decoder than encoder layers and different heads and FFN widths in the two stacks, so that a
    mix-up of the stacks cannot pass."""
    return transformers.AutoConfig.for_model(
        model_type, vocab_size=99, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=41, max_position_embeddings=20,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, **VARIANTS[model_type])


@functools.cache
def checkpoint(model_type, tmp_root):
    """(PyTorch model in eval mode, its save_pretrained folder, our model, our params loaded from the folder)."""
    torch.manual_seed(0)
    config = hf_config(model_type)
    reference = randomize_(transformers.AutoModelForSeq2SeqLM.from_config(config)).eval()
    path = os.path.join(tmp_root, model_type)
    reference.save_pretrained(path)
    family, model = models.create(config, "Seq2SeqLM")
    assert family is FAMILIES[model_type] and model.hf_architecture == type(reference).__name__
    return reference, path, model, hf_io.load_pretrained(path, param_shapes(model), model_type=model_type)


def assert_close_on_real_tokens(ours, theirs, decoder_mask):
    assert_close(ours, theirs, decoder_mask, atol=1e-5 * np.abs(theirs).max())


@pytest.mark.parametrize("model_type", list(VARIANTS))
def test_logits_match_and_checkpoints_round_trip(model_type, tmp_root, tmp_path):
    reference, path, model, params = checkpoint(model_type, tmp_root)
    apply = jit(model.apply)
    batch = seq2seq_inputs()  # pads hold pad_token_id 1; the decoder starts with 2
    expected = torch_seq2seq_logits(reference, *batch)
    assert np.abs(expected - reference.final_logits_bias.numpy()).max() > 1  # the body matters, not only the bias
    assert_close_on_real_tokens(apply({"params": params}, *batch), expected, batch[3])

    # Our save loads in PyTorch cleanly, with the keys of theirs, and computes what we compute.
    params, loaded = round_trip(model, params, reference.config, tmp_path, path)
    assert_close_on_real_tokens(apply({"params": params}, *batch), torch_seq2seq_logits(loaded, *batch), batch[3])


def transformers_generate(reference, ids, mask, eos, num_beams):
    """transformers' tokens in our layout: without the start token, pad (1) after the end, STEPS long. Blenderbot's
    config asks for encoder_no_repeat_ngram_size=3, which generate_seq2seq does not implement: off here."""
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                 num_beams=num_beams, max_new_tokens=STEPS, eos_token_id=eos, pad_token_id=1,
                                 decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None,
                                 no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, length_penalty=1.0,
                                 early_stopping=False, min_length=0, bad_words_ids=None).numpy()
    assert (out[:, 0] == 2).all()
    out = out[:, 1:]
    ended = np.cumsum(out == eos, axis=1) - (out == eos) > 0
    return np.pad(np.where(ended, 1, out), ((0, 0), (0, STEPS - out.shape[1])), constant_values=1)


@pytest.mark.parametrize("model_type", list(VARIANTS))
def test_greedy_and_beam_search_match_transformers_generate(model_type, tmp_root):
    """As end-of-sequence, a token that first appears late in some row of transformers' unconstrained greedy
    output (so that rows end at different lengths); then greedy and 4-beam search, token for token."""
    reference, _, model, params = checkpoint(model_type, tmp_root)
    ids, mask, _, _ = seq2seq_inputs(seed=2)
    free = transformers_generate(reference, ids, mask, eos=99, num_beams=1)  # 99: never generated
    eos = int(max(((free[r, p], p) for r in range(3) for p in range(STEPS) if free[r, p] not in free[r, :p]),
                  key=lambda tp: tp[1])[0])
    tokens = {num_beams: np.asarray(generate_seq2seq.generate(model, params, ids, mask, max_new_tokens=STEPS,
                                                              num_beams=num_beams, eos_token_id=eos))
              for num_beams in (1, 4)}
    for num_beams, ours in tokens.items():
        np.testing.assert_array_equal(ours, transformers_generate(reference, ids, mask, eos, num_beams))
    assert (tokens[1][:, :-1] == eos).any()  # a row ends early (the pad after it compared too)


def test_sinusoidal_tables_are_transformers_and_layouts_follow_model_type(tmp_root):
    """Our tables equal transformers' bit for bit (Pegasus's saved in its checkpoint, Marian's computed, also for
    an odd width); each model type gets its layout."""
    reference, _, model, params = checkpoint("pegasus", tmp_root)
    theirs = reference.model.encoder.embed_positions.weight.detach().numpy()
    np.testing.assert_array_equal(params["model"]["encoder"]["embed_positions"]["weight"], theirs)
    fresh = nn.unbox(marian.SinusoidalPositions(model.config, saved=True).init(key(0), np.arange(3)))  # as init'd
    np.testing.assert_array_equal(fresh["params"]["weight"], theirs)
    for positions, dim in ((20, 32), (7, 33)):
        table = transformers.models.marian.modeling_marian.MarianSinusoidalPositionalEmbedding(positions, dim)
        np.testing.assert_array_equal(marian.sinusoidal_table(positions, dim), table.create_weight().numpy())
    marian_params = checkpoint("marian", tmp_root)[3]
    assert "embed_positions" not in marian_params["model"]["encoder"]

    layouts = {t: checkpoint(t, tmp_root)[2].config for t in VARIANTS}
    fields = ("normalize_before", "add_final_layer_norm", "layernorm_embedding", "decoder_norms_tokens",
              "learned_positions", "position_offset")
    assert {t: tuple(getattr(c, f) for f in fields) for t, c in layouts.items()} == {
        "pegasus": (True, True, False, False, False, 0), "marian": (False, False, False, False, False, 0),
        "blenderbot": (True, True, False, False, True, 0), "blenderbot-small": (False, False, True, True, True, 0)}


# Real configs' sizes, written here (no network).
FULL_SIZE = {
    "pegasus": dict(d_model=1024, encoder_layers=16, decoder_layers=16, encoder_attention_heads=16,
                    decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, vocab_size=96103,
                    max_position_embeddings=1024),  # google/pegasus-large
    "marian": dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                   decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, vocab_size=58101,
                   max_position_embeddings=512, pad_token_id=58100, decoder_start_token_id=58100),  # opus-mt-en-de
    "blenderbot": dict(d_model=1280, encoder_layers=2, decoder_layers=12, encoder_attention_heads=32,
                       decoder_attention_heads=32, encoder_ffn_dim=5120, decoder_ffn_dim=5120, vocab_size=8008,
                       max_position_embeddings=128),  # facebook/blenderbot-400M-distill
    "blenderbot-small": dict(d_model=512, encoder_layers=8, decoder_layers=8, encoder_attention_heads=16,
                             decoder_attention_heads=16, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                             vocab_size=54944, max_position_embeddings=512),  # facebook/blenderbot_small-90M
}


@pytest.mark.parametrize("model_type", list(FULL_SIZE))
def test_full_size_param_counts_equal_pytorch(model_type):
    """Shapes only. transformers' parameters() hold the frozen sinusoidal tables and not the final_logits_bias
    buffer; ours hold final_logits_bias, and the tables only where checkpoints carry them (Pegasus)."""
    hf = transformers.AutoConfig.for_model(model_type, **FULL_SIZE[model_type])
    theirs = torch_param_count(transformers.AutoModelForSeq2SeqLM, hf)
    ours = param_count(models.create(hf, "Seq2SeqLM")[1]) - hf.vocab_size
    unsaved_tables = 2 * hf.max_position_embeddings * hf.d_model if model_type == "marian" else 0
    assert ours == theirs - unsaved_tables


def test_config_refusals_and_defaults():
    with pytest.raises(ValueError, match="share_encoder_decoder_embeddings=False"):
        marian.MarianConfig.from_hf(transformers.AutoConfig.for_model(
            "marian", share_encoder_decoder_embeddings=False, decoder_vocab_size=500))
    with pytest.raises(ValueError, match="decoder_vocab_size=500"):
        marian.MarianConfig.from_hf(transformers.AutoConfig.for_model("marian", decoder_vocab_size=500))
    with pytest.raises(ValueError, match="encoder_layerdrop > 0"):
        models.create(transformers.AutoConfig.for_model("pegasus", encoder_layerdrop=0.1), "Seq2SeqLM")
    with pytest.raises(ValueError, match="'pegasus' is not one of MarianConfig's"):
        marian.MarianConfig(model_type="pegasus")
    with pytest.raises(ValueError, match="model_type 'pegasus' is not supported for this task"):
        models.create(transformers.AutoConfig.for_model("pegasus"), "SequenceClassification")
    opus = marian.MarianConfig.from_hf(transformers.AutoConfig.for_model("marian"))
    assert (opus.pad_token_id, opus.decoder_start_token_id, opus.eos_token_id, opus.bos_token_id) == (
        58100, 58100, 0, None)
    large = pegasus.PegasusConfig.from_hf(transformers.AutoConfig.for_model("pegasus"))
    assert (large.decoder_start_token_id, large.pad_token_id, large.forced_eos_token_id) == (0, 0, 1)
    assert blenderbot.BlenderbotConfig(model_type="blenderbot-small").decoder_norms_tokens
    # A Marian checkpoint's old copies of the sinusoidal tables are dropped on load.
    assert any("embed_positions" in p for p in marian.FAMILY.hf.ignored)
    assert not any("embed_positions" in p for p in pegasus.FAMILY.hf.ignored)
