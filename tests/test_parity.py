"""Parity with transformers' PyTorch models, one table keyed by model type: a row per family variant (its tiny config,
heads, inputs, tolerance and the features it pins), and one test that runs every row and head: their checkpoint
loads, gives their logits on padded inputs, and our save of it loads in PyTorch cleanly with the keys of theirs and
computes what we compute. Every registered model type has a row. What one family alone does (generation, its tables,
its loading rules, full-size counts, refusals) is in test_parity_quirks.py."""

import dataclasses
import functools
import os
from typing import Callable

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain.models import FAMILIES, get_family  # noqa: E402
from tests.parity import (assert_close, decoder_inputs, encoder_inputs, jit, load_ours, round_trip,  # noqa: E402
                          seq2seq_inputs, torch_logits, torch_seq2seq_logits)

MLM, CLS, CLM, S2S = "MaskedLM", "SequenceClassification", "CausalLM", "Seq2SeqLM"
AUTO = {MLM: transformers.AutoModelForMaskedLM, CLS: transformers.AutoModelForSequenceClassification,
        CLM: transformers.AutoModelForCausalLM, S2S: transformers.AutoModelForSeq2SeqLM}


@dataclasses.dataclass(frozen=True)
class Row:
    name: str  # "model_type" or "model_type/variant"
    settings: dict  # the tiny config, in transformers' field names
    heads: tuple  # our heads this row runs
    inputs: Callable  # (hf config, head) -> the batch: (ids, mask[, types]) or (ids, mask, decoder ids, decoder mask)
    real_tokens: int | None = 1  # the batch entry whose 1s are the positions compared; None: every position
    relative: bool = False  # atol 1e-5 times the largest reference logit (when above 1), not 1e-5
    prepare: Callable | None = None  # draws the PyTorch model's weights away from init (norms away from 1, ...)
    round_trip: bool = True
    checks: tuple = ()  # (head, our model, params, reference, its logits) -> asserts: the features this row pins

    @property
    def model_type(self):
        return self.name.split("/")[0]

    def assert_close(self, ours, theirs, batch):
        atol = 1e-5 * max(1.0, float(np.abs(theirs).max())) if self.relative else 1e-5
        assert_close(ours, theirs, None if self.real_tokens is None else batch[self.real_tokens], atol=atol)


# --------------------------------------------------------------------------------------------------------- inputs
def encoder(length=9, right_from=5, segments=None):
    """Right-padded ids (pads hold pad_token_id) and segment ids: random where the model has two token types, and
    for the models that have none (DistilBERT, ModernBERT): ours must ignore what theirs never sees."""
    def inputs(config, head):
        two = getattr(config, "type_vocab_size", 2) > 1 if segments is None else segments
        return encoder_inputs(config, segments=two, length=length, right_from=right_from)
    return inputs


def decoder(**options):
    return lambda config, head: decoder_inputs(**options)


def seq2seq(**options):
    return lambda config, head: seq2seq_inputs(**options)


def long_decoder(config, head):
    """[2, 24] ids and mask (24 > every original context length of the RoPE rows): row 1 left-padded by 3, right by
    2."""
    ids = np.random.default_rng(0).integers(3, 99, (2, 24))
    mask = np.ones_like(ids)
    mask[1, :3], mask[1, -2:] = 0, 0
    return ids * mask, mask


def big_bird_inputs(length, seed=0):
    """[3, length] ids, mask and segment ids: row 1 padded after 50 tokens, row 2 after 41 (pads hold id 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 99, (3, length))
    mask = np.ones_like(ids)
    mask[1, min(50, length - 2):], mask[2, min(41, length - 4):] = 0, 0
    return ids * mask, mask, rng.integers(0, 2, ids.shape) * mask


def bart_inputs(config, head):
    """Seq2seq inputs (pads hold 1, the decoder starts with 2); for the classifier [3, 9] ids with two eos tokens (2)
    in every row, as sentence pairs have (transformers requires the same count in every row): row 0 full, row 1
    right-padded, row 2 left-padded."""
    if head != CLS:
        return seq2seq_inputs()
    rng = np.random.default_rng(0)
    ids, mask = rng.integers(3, 99, (3, 9)), np.ones((3, 9), np.int64)
    mask[1, 6:], mask[2, :3] = 0, 0
    ids[0, [3, 8]], ids[1, [2, 5]], ids[2, [5, 8]] = 2, 2, 2
    return np.where(mask == 1, ids, 1), mask


# ------------------------------------------------------------------------------- PyTorch weights away from their init
def norms_and_biases(model):
    """Norms away from 1 and biases away from 0, so that a swapped or dropped one shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)


def bart_weights(model):
    """Weights wider than the 0.02 init, nonzero biases, norms away from 1 and a nonzero final_logits_bias: a swapped
    or dropped param, or a wrong position row, then shows in the logits. Frozen sinusoidal tables stay as
    transformers computes them (Marian's are never saved)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name and not p.requires_grad:
                continue
            if "layer_norm" in name or "layernorm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.3 if name.endswith("weight") else 0.1)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_(0, 1.0)
    return model


def gemma_norms(model):
    """transformers starts the (1 + weight) norms at 0: give them weights to get right."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)


def t5_weights(model, untie=True):
    """Norms away from 1; with `untie`, an lm_head of its own (transformers 5 ties it at init even for
    v1.1/mT5/LongT5; trained checkpoints are not tied)."""
    config = model.config
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
        if untie:
            model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model))


# ------------------------------------------------------------------------------------------------ per-row checks
def large_logits(head, model, params, reference, expected):
    assert np.abs(expected).max() > 1  # large enough for atol to mean something


def body_matters(head, model, params, reference, expected):
    if head == S2S:  # the body matters, not only final_logits_bias
        assert np.abs(expected - reference.final_logits_bias.numpy()).max() > 1


def bart_layout(head, model, params, reference, expected):
    mbart = model.config.model_type == "mbart"
    assert (model.config.normalize_before, model.config.add_final_layer_norm) == (mbart, mbart)
    assert ("layer_norm" in params["model"]["encoder"]) == mbart
    if head == S2S:
        np.testing.assert_array_equal(params["final_logits_bias"], reference.final_logits_bias.numpy())


def tied(tie):
    def check(head, model, params, reference, expected):
        assert model.config.tie_word_embeddings == tie
        assert ("lm_head" in params) != tie
    return check


def softcap_bites(head, model, params, reference, expected):
    if model.config.final_logit_softcapping:  # the cap shapes the logits: it is not a no-op in this test
        assert np.abs(expected).max() > 0.5 * model.config.final_logit_softcapping


def rope_type(name):
    def check(head, model, params, reference, expected):
        assert model.config.rope["rope_type"] == name
    return check


def big_bird_attention(head, model, params, reference, expected):
    assert reference.bert.attention_type == reference.config.attention_type  # transformers ran what it was asked to


# ---------------------------------------------------------------------------------------------------------- table
# initializer_range 0.2 (not 0.02) so that the logits are large enough for atol to mean something.
BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=32, initializer_range=0.2, num_labels=3)
ROBERTA = dict(BERT, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)
REGRESSION = dict(num_labels=1, problem_type="regression")
# Embeddings narrower than hidden_size (both families' projections up and down); 3 layers, so that ALBERT's shared
# layer is applied more than twice.
ALBERT = dict(BERT, embedding_size=16, num_hidden_layers=3)
DISTILBERT = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=99, max_position_embeddings=32,
                  initializer_range=0.2, num_labels=3)
# block_size 4, 2 random blocks: block-sparse needs more than (5 + 2 * 2) * 4 = 36 tokens; the inputs have 64.
BIG_BIRD = dict(BERT, max_position_embeddings=128, block_size=4, num_random_blocks=2, attention_type="block_sparse")
# A window of +-2 and every other layer global: 11 tokens see both kinds of layer differ; all the biases.
MODERNBERT = dict(BERT, num_hidden_layers=4, intermediate_size=24, max_position_embeddings=64, pad_token_id=0,
                  local_attention=4, global_attn_every_n_layers=2, global_rope_theta=500.0, norm_bias=True,
                  attention_bias=True, mlp_bias=True, classifier_bias=True, bos_token_id=1, eos_token_id=2,
                  cls_token_id=1, sep_token_id=2)
# DeBERTa-v3's settings, with buckets small enough that 11 tokens reach the log-spaced ones.
DEBERTA = dict(BERT, max_position_embeddings=64, pad_token_id=0, relative_attention=True, position_buckets=4,
               pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
               max_relative_positions=-1, type_vocab_size=0)

DECODER = dict(vocab_size=99, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GPT2 = dict(DECODER, n_positions=32, n_embd=32, n_layer=2, n_head=4)
LLAMA = dict(DECODER, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
OPT_LIKE = dict(vocab_size=99, pad_token_id=1, bos_token_id=0, eos_token_id=2)
OPT = dict(OPT_LIKE, hidden_size=32, ffn_dim=37, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=32, init_std=0.2, dropout=0.1)
GEMMA = dict(DECODER, hidden_size=32, intermediate_size=37, num_attention_heads=4, max_position_embeddings=64)
ROPE = dict(LLAMA, num_key_value_heads=2)
LONGROPE = dict(rope_type="longrope", short_factor=[1.0, 1.1, 1.2, 1.3], long_factor=[1.0, 1.5, 3.0, 7.0],
                original_max_position_embeddings=16)  # one factor per frequency of head_dim 8

# Fewer decoder than encoder layers and different heads and FFN widths in the two stacks, so that a mix-up of the
# stacks cannot pass; few buckets and a short max_distance, so that T5's log-spaced buckets are exercised.
T5 = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_decoder_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.1)
# local_radius 4 (blocks of 5): the inputs span several blocks and global tokens.
LONGT5 = dict(T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False, local_radius=4, global_block_size=4,
              encoder_attention_type="local", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
LONGT5.pop("dropout_rate")
BART = dict(vocab_size=99, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=41, max_position_embeddings=20,
            dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, num_labels=3)
# The BART-like variants, each as its checkpoints are; the same special ids for all (pad 1, eos 2).
BART_LIKE = dict(BART, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                 forced_eos_token_id=2, scale_embedding=True)

ENCODER_ROW = dict(inputs=encoder())
T5_ROW = dict(inputs=seq2seq(low=2, start_id=0, pad_id=0), real_tokens=None, relative=True, prepare=t5_weights)
LONGT5_ROW = dict(inputs=seq2seq(length=23, right_from=15, low=2, start_id=0, pad_id=0), real_tokens=3,
                  relative=True, prepare=t5_weights, checks=(tied(False),))
BART_ROW = dict(inputs=bart_inputs, real_tokens=None, relative=True, prepare=bart_weights,
                checks=(bart_layout, body_matters))
VARIANT_ROW = dict(inputs=seq2seq(), real_tokens=3, relative=True, prepare=bart_weights, checks=(body_matters,))
OPT_ROW = dict(inputs=decoder(pad_id=1, low=5), prepare=norms_and_biases, checks=(large_logits,))
GEMMA_ROW = dict(inputs=decoder(), prepare=gemma_norms, checks=(softcap_bites,))

TABLE = [
    # ------------------------------------------------------------------------------------------------ encoders
    Row("bert", BERT, (MLM, CLS), real_tokens=None, **dict(ENCODER_ROW)),
    Row("bert/regression", dict(BERT, **REGRESSION), (CLS,), **ENCODER_ROW),
    Row("roberta", ROBERTA, (MLM, CLS), real_tokens=None, **ENCODER_ROW),
    Row("roberta/regression", dict(ROBERTA, **REGRESSION), (CLS,), **ENCODER_ROW),
    Row("xlm-roberta", ROBERTA, (MLM, CLS), **ENCODER_ROW),  # one token type, as the Hub's configs
    Row("roberta-prelayernorm", dict(ROBERTA, type_vocab_size=2), (MLM, CLS), **ENCODER_ROW),
    Row("albert", ALBERT, (MLM, CLS), inputs=encoder(segments=True)),
    Row("roformer", ALBERT, (MLM, CLS), inputs=encoder(segments=True)),
    # Same widths (no embeddings_project) and the values rotated too.
    Row("roformer/rotary-value", dict(ALBERT, embedding_size=32, rotary_value=True), (MLM,),
        inputs=encoder(segments=True)),
    # embeddings_project and a generator head of its own width; gelu_new: the generator's gelu must not follow
    # hidden_act.
    Row("electra", dict(BERT, embedding_size=16, hidden_act="gelu_new"), (MLM, CLS), **ENCODER_ROW),
    Row("electra/regression", dict(BERT, embedding_size=16, **REGRESSION), (CLS,), **ENCODER_ROW),
    # gelu_new: the MLM head's activation must be the config's, not a fixed gelu.
    Row("distilbert", dict(DISTILBERT, activation="gelu_new"), (MLM, CLS), **ENCODER_ROW),
    Row("distilbert/regression", dict(DISTILBERT, **REGRESSION), (CLS,), **ENCODER_ROW),
    Row("big_bird", BIG_BIRD, (MLM, CLS), inputs=lambda config, head: big_bird_inputs(64), relative=True,
        checks=(big_bird_attention,)),
    # Full attention with the other settings of q/k/v bias and embedding scale.
    Row("big_bird/full", dict(BIG_BIRD, attention_type="original_full", use_bias=False, rescale_embeddings=True),
        (MLM, CLS), inputs=lambda config, head: big_bird_inputs(64), relative=True, checks=(big_bird_attention,)),
    Row("modernbert", MODERNBERT, (MLM, CLS), inputs=encoder(11, 6)),
    Row("modernbert/mean", dict(MODERNBERT, classifier_pooling="mean", attn_implementation="eager"), (CLS,),
        inputs=encoder(11, 6)),
    # ModernBERT-base's biases: none but the decoder's and the classifier's.
    Row("modernbert/base", dict(MODERNBERT, norm_bias=False, attention_bias=False, mlp_bias=False,
                                classifier_bias=False, global_attn_every_n_layers=3), (MLM,), inputs=encoder(11, 6)),
    # Scaled RoPE, each layer type with its own base.
    Row("modernbert/yarn", dict(MODERNBERT, rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                          "original_max_position_embeddings": 32}), (MLM,),
        inputs=encoder(11, 6)),
    Row("deberta-v2", DEBERTA, (MLM, CLS), inputs=encoder(11, 6)),  # MLM legacy: `cls.predictions`, as v3's configs
    Row("deberta-v2/lm-predictions", dict(DEBERTA, legacy=False), (MLM,), inputs=encoder(11, 6)),
    # DeBERTa-v2's other settings: separate position projections, c2p alone, absolute positions, token types,
    # narrower embeddings, no buckets; and p2c alone.
    Row("deberta-v2/v2", dict(DEBERTA, share_att_key=False, pos_att_type="c2p", position_biased_input=True,
                              type_vocab_size=2, embedding_size=16, position_buckets=-1, max_relative_positions=6,
                              norm_rel_ebd="none"), (CLS,), inputs=encoder(11, 6)),
    Row("deberta-v2/p2c", dict(DEBERTA, share_att_key=False, pos_att_type="p2c", embedding_size=16), (MLM,),
        inputs=encoder(11, 6)),
    # ------------------------------------------------------------------------------------------------ decoders
    Row("gpt2", GPT2, (CLM,), inputs=decoder()),
    Row("gpt2/untied", dict(GPT2, tie_word_embeddings=False, activation_function="gelu"), (CLM,), inputs=decoder()),
    Row("gpt-sw3", dict(GPT2, activation_function="gelu"), (CLM,), inputs=decoder()),  # a GPT-2 (see the quirks)
    # Layers global, local, local; a window of 3 slots, shorter than the 9-token inputs; tied head.
    Row("gpt_neo", dict(DECODER, hidden_size=32, num_layers=3, num_heads=4, max_position_embeddings=32,
                        window_size=3, attention_types=[[["global", "local"], 1], [["local"], 1]]), (CLM,),
        inputs=decoder()),
    # Rotary on 4 of each head's 8 dims, an MLP width of its own, untied head with bias (GPT-J's default).
    Row("gptj", dict(DECODER, n_embd=32, n_layer=2, n_head=4, n_positions=32, rotary_dim=4, n_inner=40), (CLM,),
        inputs=decoder()),
    # Rotary on the whole head; head tied to the embeddings, its bias kept.
    Row("gptj/tied", dict(DECODER, n_embd=32, n_layer=2, n_head=4, n_positions=32, rotary_dim=8,
                          tie_word_embeddings=True, activation_function="gelu"), (CLM,), inputs=decoder()),
    Row("opt", OPT, (CLM,), **OPT_ROW),  # pre-norm, final norm, tied head (opt-125m, opt-1.3b, ...)
    # opt-350m's layout: post-norm, no final norm, embeddings in a narrower width with project_in/out.
    Row("opt/350m", dict(OPT, do_layer_norm_before=False, word_embed_proj_dim=16, activation_function="gelu"),
        (CLM,), **OPT_ROW),
    Row("opt/bare", dict(OPT, enable_bias=False, layer_norm_elementwise_affine=False, tie_word_embeddings=False),
        (CLM,), **OPT_ROW),
    # 6 heads: 4 ALiBi slopes of the power-of-two sequence, 2 from the one of 8 heads.
    Row("bloom", dict(OPT_LIKE, hidden_size=48, n_layer=2, n_head=6, initializer_range=0.2), (CLM,), **OPT_ROW),
    Row("bloom/post", dict(OPT_LIKE, hidden_size=36, n_layer=2, n_head=3, initializer_range=0.2,
                           apply_residual_connection_post_layernorm=True, tie_word_embeddings=False), (CLM,),
        **OPT_ROW),
    Row("xglm", dict(OPT_LIKE, d_model=32, ffn_dim=37, num_layers=2, attention_heads=4, init_std=0.2,
                     max_position_embeddings=32), (CLM,), **OPT_ROW),
    # An odd width (a zero column), unscaled embeddings, untied head, and pad id 4: transformers zeroes row 4 of the
    # sinusoid table, which is position 2, a real token's.
    Row("xglm/odd", dict(OPT_LIKE, d_model=33, ffn_dim=37, num_layers=2, attention_heads=3, init_std=0.2,
                         max_position_embeddings=32, scale_embedding=False, tie_word_embeddings=False,
                         pad_token_id=4), (CLM,), **OPT_ROW),
    # GQA (2 kv heads), biases on q/k/v/o and the MLP, a non-default rope_theta, untied head.
    Row("llama", dict(LLAMA, num_key_value_heads=2, attention_bias=True, mlp_bias=True, rope_theta=500.0), (CLM,),
        inputs=decoder()),
    # RoPE scaling, past the original context length: Llama-3.2-1B's llama3 values with a short original context
    # (so that a medium-frequency band exists at head_dim 8); linear, dynamic, yarn, longrope.
    Row("llama/llama3", dict(ROPE, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)), (CLM,), inputs=long_decoder, round_trip=False,
        checks=(rope_type("llama3"),)),
    Row("llama/linear", dict(ROPE, max_position_embeddings=16, rope_parameters=dict(
        rope_type="linear", factor=2.0, rope_theta=100.0)), (CLM,), inputs=long_decoder, round_trip=False,
        checks=(rope_type("linear"),)),
    Row("llama/dynamic", dict(ROPE, max_position_embeddings=16, rope_parameters=dict(rope_type="dynamic", factor=3.0)),
        (CLM,), inputs=long_decoder, round_trip=False, checks=(rope_type("dynamic"),)),
    Row("llama/yarn", dict(ROPE, rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=100.0,
                                                      original_max_position_embeddings=16)), (CLM,),
        inputs=long_decoder, round_trip=False, checks=(rope_type("yarn"),)),
    Row("llama/longrope", dict(ROPE, rope_parameters=LONGROPE), (CLM,), inputs=long_decoder, round_trip=False,
        checks=(rope_type("longrope"),)),
    # Multi-query attention and a window of 3 slots on every layer, shorter than the 9-token inputs.
    Row("mistral", dict(LLAMA, num_key_value_heads=1, sliding_window=3, tie_word_embeddings=False), (CLM,),
        inputs=decoder()),
    # q/k/v biases, tied head, the window on layers 1 and 2 only (max_window_layers=1).
    Row("qwen2", dict(LLAMA, num_hidden_layers=3, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                      max_window_layers=1, tie_word_embeddings=True), (CLM,), inputs=decoder()),
    # head_dim 16 in a width of 32, biases on q/k/v/o, tied head, the window of 4 slots on layers 1 and 2 only.
    Row("qwen3", dict(DECODER, intermediate_size=37, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                      head_dim=16, num_hidden_layers=3, attention_bias=True, use_sliding_window=True,
                      sliding_window=4, max_window_layers=1, tie_word_embeddings=True, max_position_embeddings=64),
        (CLM,), inputs=decoder(length=12, right_from=7)),
    # RoPE on half of each head (8 of 16 features), longrope past 8 positions (the 12-token inputs pass them), a
    # window of 5 slots, untied head.
    Row("phi3", dict(DECODER, intermediate_size=37, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                     num_hidden_layers=2, partial_rotary_factor=0.5, sliding_window=5, max_position_embeddings=32,
                     original_max_position_embeddings=8, rope_parameters=dict(
                         rope_type="longrope", rope_theta=100.0, short_factor=[1.0, 1.2, 1.5, 2.0],
                         long_factor=[1.0, 2.0, 5.0, 9.0])), (CLM,), inputs=decoder(length=12, right_from=7)),
    # Multi-query attention, head_dim 16 with 4 heads in a width of 32, q/k/v/o biases, a non-default rope_theta.
    Row("gemma", dict(GEMMA, num_hidden_layers=2, num_key_value_heads=1, head_dim=16, attention_bias=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 500.0}), (CLM,), **GEMMA_ROW),
    # Caps small enough to bite, a window of 3 slots on layers 0 and 2 (transformers' default pattern), its own
    # attention scale.
    Row("gemma2", dict(GEMMA, num_hidden_layers=3, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=20,
                       attn_logit_softcapping=1.5, final_logit_softcapping=4.0, sliding_window=3), (CLM,),
        **GEMMA_ROW),
    # Local layers 0, 1, 3 with base 20, the global layer 2 with base 500 and linear RoPE scaling (as gemma-3-4b's
    # text model, factor 8); a window of 4; q/k norms. The attention cap is set but transformers' Gemma3 code never
    # applies it, nor do we.
    Row("gemma3_text", dict(
        GEMMA, num_hidden_layers=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=10, attention_bias=True,
        sliding_window=4, sliding_window_pattern=3, attn_logit_softcapping=1.0, final_logit_softcapping=6.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 500.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 20.0}}), (CLM,), **GEMMA_ROW),
    # --------------------------------------------------------------------------------------- encoder-decoders
    Row("t5", dict(T5, feed_forward_proj="relu", tie_word_embeddings=True), (S2S,), checks=(tied(True),),
        **dict(T5_ROW, prepare=functools.partial(t5_weights, untie=False))),  # v1.0
    Row("t5/v1.1", dict(T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False), (S2S,),
        checks=(tied(False),), **T5_ROW),
    Row("mt5", dict(T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False), (S2S,), checks=(tied(False),),
        **T5_ROW),
    Row("longt5", LONGT5, (S2S,), **LONGT5_ROW),
    Row("longt5/tglobal", dict(LONGT5, encoder_attention_type="transient-global"), (S2S,), **LONGT5_ROW),
    # A global block of 3, not a power of 2: transformers' float block ids.
    Row("longt5/tglobal-3", dict(LONGT5, encoder_attention_type="transient-global", global_block_size=3), (S2S,),
        **LONGT5_ROW),
    Row("bart", BART, (S2S, CLS), **BART_ROW),
    Row("mbart", dict(BART, scale_embedding=True), (S2S, CLS), **BART_ROW),  # as its checkpoints: scaled embeddings
    Row("pegasus", dict(BART_LIKE, activation_function="relu"), (S2S,), **VARIANT_ROW),
    Row("marian", dict(BART_LIKE, activation_function="swish"), (S2S,), **VARIANT_ROW),
    Row("blenderbot", dict(BART_LIKE, activation_function="gelu"), (S2S,), **VARIANT_ROW),
    Row("blenderbot-small", dict(BART_LIKE, activation_function="gelu"), (S2S,), **VARIANT_ROW),
]
ROWS = {row.name: row for row in TABLE}
assert len(ROWS) == len(TABLE), "a row name is used twice"


def config(name, **overrides):
    """The transformers config of row `name` (with `overrides`)."""
    row = ROWS[name]
    hf_config = transformers.AutoConfig.for_model(row.model_type, **{**row.settings, **overrides})
    hf_config.model_type = row.model_type  # "gpt-sw3" is a GPT2Config that says "gpt2"
    return hf_config


CHECKPOINTS = {}


def checkpoint(name, head, tmp_root, **overrides):
    """(transformers' model for `head` of row `name` (with `overrides`), seeded 0 and in eval mode, the directory it
    saved itself to, our model, our params loaded from there). Made once per test module (tmp_root)."""
    cache_key = (name, head, tmp_root, repr(sorted(overrides.items())))
    if cache_key not in CHECKPOINTS:
        row, hf_config = ROWS[name], config(name, **overrides)
        torch.manual_seed(0)
        reference = AUTO[head].from_config(hf_config)
        if row.prepare is not None:
            row.prepare(reference)
        reference.eval()
        path = os.path.join(tmp_root, f"{name.replace('/', '-')}-{head}-{len(CHECKPOINTS)}")
        reference.save_pretrained(path)
        CHECKPOINTS[cache_key] = (reference, path, *load_ours(hf_config, head, path))
    return CHECKPOINTS[cache_key]


def reference_logits(reference, batch):
    return torch_seq2seq_logits(reference, *batch) if len(batch) == 4 else torch_logits(reference, *batch)


CASES = [pytest.param(row.name, head, id=f"{row.name}-{head}") for row in TABLE for head in row.heads]


@pytest.mark.parametrize("name,head", CASES)
def test_logits_match_and_checkpoints_round_trip(name, head, tmp_root, tmp_path):
    row = ROWS[name]
    reference, path, model, params = checkpoint(name, head, tmp_root)
    assert get_family(row.model_type).heads[head] is type(model)
    assert model.hf_architecture == type(reference).__name__
    apply = jit(model.apply)
    batch = row.inputs(reference.config, head)
    expected = reference_logits(reference, batch)
    logits = apply({"params": params}, *batch)
    assert logits.dtype == jnp.float32 and logits.shape == expected.shape
    if head == CLS:  # (BART's classifier has no regression: no problem_type)
        assert (model.config.num_labels, getattr(model.config, "problem_type", None)) == (
            reference.config.num_labels, reference.config.problem_type)
    row.assert_close(logits, expected, batch)
    for check in row.checks:
        check(head, model, params, reference, expected)
    if head == MLM:  # run_mlm_flax.py runs the head only at the masked positions: the same logits there
        positions = np.array([[0, 4, 8], [4, 1, 1], [2, 7, 0]], np.int32)
        at = jit(functools.partial(model.apply, positions=positions))({"params": params}, *batch)
        np.testing.assert_allclose(at, np.take_along_axis(np.asarray(logits), positions[..., None], axis=1),
                                   atol=1e-6, rtol=1e-6)

    if row.round_trip:  # our save loads in PyTorch cleanly, with the keys of theirs, and computes what we compute
        params, loaded = round_trip(model, params, reference.config, tmp_path, path, auto=AUTO[head])
        if "final_logits_bias" in params:
            np.testing.assert_array_equal(loaded.final_logits_bias.numpy(), params["final_logits_bias"])
        row.assert_close(apply({"params": params}, *batch), reference_logits(loaded, batch), batch)


def test_every_registered_model_type_has_a_row():
    assert {row.model_type for row in TABLE} == set(FAMILIES)
    for row in TABLE:  # and every head of its family, in some row of its model type
        assert set(row.heads) <= set(FAMILIES[row.model_type].heads), row.name
    for model_type, family in FAMILIES.items():
        # (BART's MaskedLM is its conditional-generation model: test_parity_quirks checks its loss on masked inputs.)
        unchecked = {MLM} if model_type in ("bart", "mbart") else set()
        assert {h for row in TABLE if row.model_type == model_type for h in row.heads} == set(family.heads) - unchecked

