"""Parity with transformers' PyTorch BigBird and LongT5: load their checkpoints, match their logits (block-sparse and
full attention; local and transient-global encoders; padded inputs), write checkpoints they load without missing or
unexpected keys, generate their tokens (greedy and 4 beams), and count the full-size models' params as they do."""

import functools
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain import generate_seq2seq, models  # noqa: E402
from flaxtrain.models import big_bird, longt5  # noqa: E402
from tests.parity import (load_ours, param_count, round_trip, seq2seq_inputs, torch_logits,  # noqa: E402
                          torch_param_count, torch_seq2seq_logits)


# ------------------------------------------------------------------------------------------------------------ BigBird
BIG_BIRD_HEADS = ("ForMaskedLM", "ForSequenceClassification")
LONG, SHORT = 64, 9  # block_size 4, 2 random blocks: block-sparse needs more than (5 + 2 * 2) * 4 = 36 tokens


def big_bird_config(attention_type="block_sparse", **overrides):
    # initializer_range 0.2 (not 0.02) so that the logits are large enough for atol to mean something.
    return transformers.BigBirdConfig(**{**dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=128, initializer_range=0.2, num_labels=3, block_size=4, num_random_blocks=2,
        attention_type=attention_type), **overrides})


@functools.cache
def big_bird_checkpoint(head, attention_type, tmp_root, **overrides):
    """(a fresh PyTorch model in eval mode, the directory it saved itself to). Fresh matters: transformers switches a
    block-sparse model to full attention for good once it sees a short input."""
    torch.manual_seed(0)
    reference = getattr(transformers, "BigBird" + head)(big_bird_config(attention_type, **overrides)).eval()
    path = os.path.join(tmp_root, f"big_bird{head}{attention_type}{sorted(overrides.items())}")
    reference.save_pretrained(path)
    return reference, path


def big_bird_inputs(length, seed=0):
    """[3, length] ids, mask and segment ids: row 1 padded after 50 tokens, row 2 after 41 (pads hold id 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 99, (3, length))
    mask = np.ones_like(ids)
    mask[1, min(50, length - 2):], mask[2, min(41, length - 4):] = 0, 0
    return ids * mask, mask, rng.integers(0, 2, ids.shape) * mask


def assert_close(ours, theirs, where=None):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    if where is not None:  # the real tokens only
        ours, theirs = ours[where == 1], theirs[where == 1]
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * max(1.0, np.abs(theirs).max()), rtol=1e-5)


@pytest.mark.parametrize("attention_type", big_bird.ATTENTION_TYPES)
@pytest.mark.parametrize("head", BIG_BIRD_HEADS)
def test_big_bird_logits_match_and_checkpoints_round_trip(head, attention_type, tmp_root, tmp_path):
    # Full attention runs with the other settings of q/k/v bias and embedding scale.
    options = dict(use_bias=False, rescale_embeddings=True) if attention_type == "original_full" else {}
    reference, path = big_bird_checkpoint(head, attention_type, tmp_root, **options)
    model, params = load_ours(reference.config, head.removeprefix("For"), path)
    assert model.hf_architecture == "BigBird" + head
    apply = jax.jit(model.apply)
    batch = big_bird_inputs(LONG)
    where = batch[1] if head == "ForMaskedLM" else None
    assert_close(apply({"params": params}, *batch), torch_logits(reference, *batch), where)
    assert reference.bert.attention_type == attention_type  # transformers ran what it was asked to
    if attention_type == "block_sparse":  # the same params: one save suffices
        params, loaded = round_trip(model, params, reference.config, tmp_path, path)
        assert_close(apply({"params": params}, *batch), torch_logits(loaded, *batch), where)


def test_big_bird_masked_positions_and_padding_to_block_size(tmp_root):
    """62 tokens are padded to 64 inside the model (as transformers does); the MLM head at `positions=` (as
    run_mlm_flax.py calls it) gives the logits of those tokens."""
    reference, path = big_bird_checkpoint("ForMaskedLM", "block_sparse", tmp_root)
    model, params = load_ours(reference.config, "MaskedLM", path)
    batch = big_bird_inputs(62, seed=1)
    positions = np.array([[0, 7, 61], [3, 40, 47], [1, 2, 30]])
    logits = jax.jit(model.apply)({"params": params}, *batch, positions=positions)
    theirs = np.take_along_axis(torch_logits(reference, *batch), positions[..., None], axis=1)
    assert logits.shape == (3, 3, 99)
    assert_close(logits, theirs)


def test_big_bird_training_mode_random_blocks(tmp_root):
    """In training transformers draws the random blocks with NumPy seeded by the layer index (in evaluation they are
    all block 0): with dropout off, our training-mode forward computes its training-mode logits, which differ from
    the evaluation ones."""
    off = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    reference, path = big_bird_checkpoint("ForMaskedLM", "block_sparse", tmp_root, **off)
    model, params = load_ours(reference.config, "MaskedLM", path)
    batch = big_bird_inputs(LONG)
    train = jax.jit(functools.partial(model.apply, deterministic=False))({"params": params}, *batch)
    assert_close(train, torch_logits(reference.train(), *batch), batch[1])
    evaluation = torch_logits(reference.eval(), *batch)
    assert np.abs(np.asarray(train) - evaluation).max() > 1e-2


@pytest.mark.parametrize("length,layer,block_size", [(64, 0, 4), (64, 1, 4), (48, 3, 4), (1024, 1, 16)])
def test_big_bird_random_blocks_equal_transformers(length, layer, block_size):
    """transformers' own code (1024 takes the paper's plan): the same blocks for each head. (Its split plan, for
    r + 5 < nb <= 2r + 5 blocks, fails in transformers itself and no input that runs block-sparse reaches it.)"""
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention

    hf_config = big_bird_config(block_size=block_size, num_random_blocks=3, max_position_embeddings=4096)
    theirs = BigBirdBlockSparseAttention(hf_config, seed=layer).train()
    np.random.seed(layer)
    heads, blocks = hf_config.num_attention_heads, length // block_size
    if length == 1024:
        expected = [theirs._bigbird_block_rand_mask(4096, 4096, block_size, block_size, 3, last_idx=1024)[:blocks - 2]
                    for _ in range(heads)]
    else:
        plan = theirs._get_rand_attn_plan(length, block_size, 3)
        expected = theirs._bigbird_block_rand_mask_with_head(length, length, block_size, block_size, heads, *plan)
    ours = big_bird.random_blocks(big_bird.BigBirdConfig.from_hf(hf_config), length, layer, training=True)
    np.testing.assert_array_equal(ours, np.stack(expected))
    assert ours.any()


def test_big_bird_short_input_runs_full_attention_with_a_warning(tmp_root, caplog):
    reference, path = big_bird_checkpoint("ForSequenceClassification", "block_sparse", tmp_root, num_labels=2)
    model, params = load_ours(reference.config, "SequenceClassification", path)
    batch = big_bird_inputs(SHORT)
    with caplog.at_level(logging.WARNING, logger="flaxtrain.models.big_bird"):
        logits = model.apply({"params": params}, *batch)
    assert "Changing attention type to 'original_full'" in caplog.text
    assert_close(logits, torch_logits(reference, *batch))
    assert reference.bert.attention_type == "original_full"  # transformers switched, for good


def test_big_bird_full_size_param_count():
    """bigbird-roberta-base, shapes only: the counts equal the PyTorch models' (the pooler included, which every
    transformers head has)."""
    hf_config = transformers.BigBirdConfig(vocab_size=50358, hidden_size=768, num_hidden_layers=12,
                                           num_attention_heads=12, intermediate_size=3072,
                                           max_position_embeddings=4096, type_vocab_size=2)
    for head in BIG_BIRD_HEADS:
        _, model = models.create(hf_config, head.removeprefix("For"))
        expected = torch_param_count(getattr(transformers, "BigBird" + head), hf_config)
        assert param_count(model) == expected
        if head == "ForMaskedLM":
            assert expected == 128_111_286


# ------------------------------------------------------------------------------------------------------------- LongT5
# (encoder_attention_type, global_block_size): 3 is not a power of 2, so transformers' float block ids are tested.
LONGT5_VARIANTS = {"local": ("local", 4), "tglobal": ("transient-global", 4), "tglobal-3": ("transient-global", 3)}


def longt5_config(variant, **overrides):
    attention_type, global_block_size = LONGT5_VARIANTS[variant]
    # Fewer decoder than encoder layers, so that a mix-up of the two scanned stacks cannot pass; local_radius 4
    # (blocks of 5) so that the inputs span several blocks and global tokens.
    return transformers.LongT5Config(**{**dict(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=12, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, local_radius=4, global_block_size=global_block_size,
        encoder_attention_type=attention_type, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
        **overrides})


@functools.cache
def longt5_checkpoint(variant, tmp_root, **overrides):
    """(PyTorch model in eval mode, our model, our params loaded from its checkpoint, the checkpoint's directory).
    Norms are drawn away from 1 and the lm_head untied (as trained checkpoints are: transformers 5 ties it at init)."""
    hf_config = longt5_config(variant, **overrides)
    torch.manual_seed(0)
    reference = transformers.LongT5ForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
        reference.lm_head.weight = torch.nn.Parameter(torch.randn(hf_config.vocab_size, hf_config.d_model))
        if "vocab_size" in overrides:  # generation: end-of-sequence likely enough that rows end at several lengths,
            reference.lm_head.weight[hf_config.eos_token_id] *= 1.6
            reference.lm_head.weight[hf_config.pad_token_id] = 0.0  # and the pad token never generated
    path = os.path.join(tmp_root, f"longt5{variant}{sorted(overrides.items())}")
    reference.save_pretrained(path)
    return (reference, *load_ours(hf_config, "Seq2SeqLM", path), path)


def longt5_inputs():
    """Encoder ids [3, 23], row 1 right-padded and row 2 left-padded (LongT5 has no absolute positions); decoder ids
    [3, 7] starting with the start token 0, row 1 right-padded. Pads hold id 0."""
    return seq2seq_inputs(length=23, right_from=15, low=2, start_id=0, pad_id=0)


@pytest.mark.parametrize("variant", list(LONGT5_VARIANTS))
def test_longt5_logits_match_and_checkpoints_round_trip(variant, tmp_root, tmp_path):
    reference, model, params, path = longt5_checkpoint(variant, tmp_root)
    assert not model.config.tie_word_embeddings and "lm_head" in params
    apply = jax.jit(model.apply)
    batch = longt5_inputs()
    assert_close(apply({"params": params}, *batch), torch_seq2seq_logits(reference, *batch), batch[3])
    if variant != "tglobal-3":  # the same params as tglobal
        params, loaded = round_trip(model, params, reference.config, tmp_path, path)
        assert_close(apply({"params": params}, *batch), torch_seq2seq_logits(loaded, *batch), batch[3])


GENERATION_STEPS = 12


@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("variant", ["local", "tglobal"])
def test_longt5_generation_matches_transformers(variant, num_beams, tmp_root):
    """Greedy and 4-beam search of flaxtrain/generate_seq2seq.py, token for token as transformers' generate (as
    tests/test_generate_seq2seq.py does for T5), on a small vocabulary where rows end at different lengths."""
    reference, model, params, _ = longt5_checkpoint(variant, tmp_root, vocab_size=24, num_decoder_layers=3)
    rng = np.random.default_rng(3)
    ids, mask = rng.integers(4, 24, (6, 13)), np.ones((6, 13), np.int64)
    mask[1, 6:], mask[2, :5], mask[4, 1:] = 0, 0, 0
    ids = ids * mask
    ours = np.asarray(generate_seq2seq.generate(model, params, ids, mask, max_new_tokens=GENERATION_STEPS,
                                                num_beams=num_beams))
    with torch.no_grad():
        theirs = reference.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                    num_beams=num_beams, max_new_tokens=GENERATION_STEPS, eos_token_id=1,
                                    pad_token_id=0, decoder_start_token_id=0, length_penalty=1.0,
                                    early_stopping=False).numpy()[:, 1:]
    ended = np.cumsum(theirs == 1, axis=1) - (theirs == 1) > 0  # after the end: pad (beam search may write eos)
    theirs = np.pad(np.where(ended, 0, theirs), ((0, 0), (0, GENERATION_STEPS - theirs.shape[1])))
    np.testing.assert_array_equal(ours, theirs)
    ends = [np.flatnonzero(row == 1) for row in ours]
    # Not vacuous: some rows end early, some run to the end.
    assert any(len(e) and e[0] < GENERATION_STEPS - 1 for e in ends) and any(not len(e) for e in ends)


@pytest.mark.parametrize("attention_type", list(longt5.ATTENTION_TYPES))
def test_longt5_full_size_param_count(attention_type):
    """long-t5-tglobal-base / long-t5-local-base, shapes only: the counts equal the PyTorch model's."""
    hf_config = transformers.LongT5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                                          num_decoder_layers=12, num_heads=12, feed_forward_proj="gated-gelu",
                                          tie_word_embeddings=False, encoder_attention_type=attention_type)
    _, model = models.create(hf_config, "Seq2SeqLM")
    with torch.device("meta"):  # allocates nothing
        reference = transformers.LongT5ForConditionalGeneration(hf_config)
        # transformers 5 ties lm_head at init; the checkpoints hold their own
        reference.lm_head.weight = torch.nn.Parameter(torch.empty(hf_config.vocab_size, hf_config.d_model))
    expected = sum(p.numel() for p in reference.parameters())
    assert param_count(model) == expected
    if attention_type == "transient-global":
        assert expected == 247_587_456


def test_configs_refuse_what_they_do_not_implement():
    with pytest.raises(ValueError, match="attention_type 'sparse'"):
        big_bird.BigBirdConfig(attention_type="sparse")
    with pytest.raises(ValueError, match="is_decoder"):
        big_bird.BigBirdConfig.from_hf(big_bird_config(is_decoder=True))
    with pytest.raises(ValueError, match="encoder_attention_type 'global'"):
        longt5.LongT5Config(encoder_attention_type="global")
    with pytest.raises(ValueError, match="is_decoder"):
        longt5.LongT5Config.from_hf(longt5_config("local", is_decoder=True))
