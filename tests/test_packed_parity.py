"""Packed rows against transformers' PyTorch models: one batch of rows that each hold several examples one after
another (segment_ids 1, 2, ... per example and 0 on the padding at the end, position_ids restarting at 0 in each)
gives the token-weighted next-token loss of the same examples run one by one, unpadded, through transformers' model of
the same tiny config and weights (test_parity.py's rows and checkpoints); for Llama the gradients too. Windows shorter
than the examples (mistral, qwen3, gemma2, gemma3_text, gpt_neo) and soft-capping (gemma2) must stay inside each
example, positions restart for RoPE, learned (gpt2, opt: offset 2), sinusoidal (xglm) and ALiBi (bloom) positions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flaxtrain import hf_io  # noqa: E402
from flaxtrain.models import attention, create, get_family  # noqa: E402
from tests.parity import jit  # noqa: E402
from tests.test_parity import CLM, checkpoint  # noqa: E402

# Each row's examples, by length: row 0 ends in 2 pads, row 1 in 1. T = 18 is within every row's positions.
LENGTHS = ((5, 7, 4), (9, 3, 5))
LENGTH = 18


def packed_batch(pad_id, seed=0):
    """-> (ids, segment_ids, position_ids, loss_mask) [2, LENGTH] int32 of the packed rows, and the examples, each
    (ids, loss_mask) [n]. Loss masks are random 0/1 (as a prompt's tokens are 0), 0 on padding."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(LENGTHS), LENGTH), pad_id, np.int32)
    segment_ids, position_ids, loss_mask = (np.zeros_like(ids) for _ in range(3))
    examples = []
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for segment, n in enumerate(lengths, 1):
            tokens, weights = rng.integers(5, 99, n), (rng.random(n) < 0.7).astype(np.int32)
            ids[row, start:start + n], loss_mask[row, start:start + n] = tokens, weights
            segment_ids[row, start:start + n], position_ids[row, start:start + n] = segment, np.arange(n)
            examples.append((tokens, weights))
            start += n
    return (ids, segment_ids, position_ids, loss_mask), examples


def next_token_weights(segment_ids, loss_mask):
    """[B, T - 1]: the weight of predicting token t + 1 from token t, that is token t + 1's loss weight if token
    t + 1 is in the same segment (the first token of the next example is never a target of the last one)."""
    return loss_mask[:, 1:] * (segment_ids[:, 1:] == segment_ids[:, :-1])


def packed_loss(model, params, batch):
    """Our token-weighted next-token loss of the packed batch: sum of weighted -log p(next token) / sum of
    weights."""
    ids, segment_ids, position_ids, loss_mask = batch
    logits = model.apply({"params": params}, ids, (segment_ids != 0).astype(jnp.int32), position_ids,
                         segment_ids=segment_ids)
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
    weights = next_token_weights(segment_ids, loss_mask)
    return jnp.sum(nll * weights) / jnp.sum(weights)


def torch_loss(reference, examples):
    """transformers' loss of the examples one by one, unpadded, labels -100 where the loss mask is 0 (its own
    shift), summed over all of them and divided by the count of targets in all: the token-weighted mean."""
    total = sum(int(weights[1:].sum()) for _, weights in examples)
    loss = 0.0
    for tokens, weights in examples:
        ids = torch.tensor(tokens[None])
        labels = torch.where(torch.tensor(weights[None]) == 1, ids, -100)
        loss = loss + reference(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                                num_items_in_batch=total).loss
    return loss


# Rows of test_parity.py's table: RoPE (windows on some layers or all, soft-capping, q/k norms), learned positions
# (gpt2, gpt_neo with a local window, opt with its offset), partial interleaved rotary (gptj), sinusoids (xglm),
# ALiBi (bloom: 4 slopes of the power-of-two sequence and 2 more).
FAMILIES = ("llama", "qwen3", "mistral", "gemma2", "gemma3_text", "gpt2", "gpt_neo", "gptj", "opt", "xglm", "bloom")


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_loss_equals_examples_one_by_one(name, tmp_root):
    reference, _, model, params = checkpoint(name, CLM, tmp_root)
    batch, examples = packed_batch(reference.config.pad_token_id)
    ours = jit(functools.partial(packed_loss, model))(params, batch)
    with torch.no_grad():
        theirs = torch_loss(reference, examples).item()
    np.testing.assert_allclose(float(ours), theirs, rtol=1e-5)


def test_packed_gradients_match_llama_with_remat(tmp_root):
    """The gradients of the packed loss, through the scanned layers rematerialised (gradient checkpointing), are
    PyTorch's of the loss of the examples one by one."""
    reference, _, _, params = checkpoint("llama", CLM, tmp_root)
    _, model = create(reference.config, CLM, gradient_checkpointing=True)
    batch, examples = packed_batch(reference.config.pad_token_id)
    grads = jit(jax.grad(functools.partial(packed_loss, model)))(params, batch)
    rules = get_family("llama").hf
    ours = hf_io.params_to_state_dict(jax.device_get(grads), scanned=rules.scanned, untransposed=rules.untransposed,
                                      renamed=rules.renamed)
    reference.zero_grad(set_to_none=True)
    torch_loss(reference, examples).backward()
    theirs = {key: p.grad.numpy() for key, p in reference.named_parameters()}
    reference.zero_grad(set_to_none=True)
    assert ours.keys() == theirs.keys()
    for key in theirs:  # entries near 0 are compared against the tensor's scale
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-6 * np.abs(theirs[key]).max(),
                                   err_msg=key)


def test_segment_masks_and_positions():
    """Examples see only their own tokens (within the window), padding no key; positions restart in each; with a
    cache (generation) segment_ids are refused."""
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 0]])
    mask, _ = attention.causal_mask(jnp.ones((1, 6), jnp.int32), sliding_window=2, segment_ids=segment_ids)
    expected = np.array([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mask[0, 0], expected)
    np.testing.assert_array_equal(attention.segment_positions(segment_ids), [[0, 1, 2, 0, 1, 0]])
    cache = attention.init_cache(1, 1, 8, 1, 4, jnp.float32)
    with pytest.raises(ValueError, match="segment_ids"):
        attention.causal_mask(jnp.ones((1, 6), jnp.int32), cache, segment_ids=segment_ids)
