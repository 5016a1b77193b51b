"""What the parity tests against transformers' PyTorch models share: padded inputs, PyTorch logits, "close at the
real tokens", the checkpoint round trip, parameter counts. Each test still states what it checks."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from flaxtrain import hf_export, hf_io  # noqa: E402
from flaxtrain.models import create, get_family  # noqa: E402

# rbg keys: compiling the default threefry hash costs seconds per graph on a small CPU.
key = functools.partial(jax.random.key, impl="rbg")
# For models this tiny, XLA's optimisation passes cost more compile time than they save at run time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})


def param_shapes(model):
    """`model`'s params as jax.ShapeDtypeStructs (no memory, nothing compiled)."""
    return jax.eval_shape(functools.partial(get_family(model.config.model_type).init_params, model), key(0))


def load_ours(hf_config, head, path):
    """(our model for `head` ("MaskedLM", "CausalLM", ...), params loaded from the PyTorch checkpoint at `path`)."""
    _, model = create(hf_config, head)
    return model, hf_io.load_pretrained(str(path), param_shapes(model), model_type=hf_config.model_type)


def torch_model(architecture, hf_config):
    """transformers' `architecture` (a class name) for `hf_config`, initialised from seed 0, in eval mode."""
    torch.manual_seed(0)
    return getattr(transformers, architecture)(hf_config).eval()


def random_params(model, scale=0.2):
    """Random params without compiling init (seconds on a small CPU)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(0, scale, s.shape).astype(s.dtype), param_shapes(model))


def fresh_template(model):
    """Stands in for init'd params: every leaf 0.5, so that fresh params are recognisable after a load."""
    return jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), param_shapes(model))


def decoder_inputs(length=9, right_from=5, pad_id=0, low=3, seed=0):
    """[3, length] ids and mask: row 0 unpadded, row 1 right-padded from `right_from`, row 2 left-padded by 3 (pads
    hold pad_id)."""
    ids = np.random.default_rng(seed).integers(low, 99, (3, length))
    mask = np.ones_like(ids)
    mask[1, right_from:], mask[2, :3] = 0, 0
    return np.where(mask == 1, ids, pad_id), mask


def encoder_inputs(config, segments, length=9, right_from=5, seed=0):
    """[3, length] ids, mask and segment ids: row 1 right-padded from `right_from`, row 2 from 2 (pads hold
    pad_token_id); random segment ids if `segments`, else zeros."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.vocab_size, (3, length))
    mask = np.ones_like(ids)
    mask[1, right_from:], mask[2, 2:] = 0, 0
    ids[mask == 0] = config.pad_token_id
    return ids, mask, rng.integers(0, 2, ids.shape) * mask if segments else np.zeros_like(ids)


def seq2seq_inputs(length=9, right_from=5, low=3, start_id=2, pad_id=1, seed=0):
    """Encoder ids and mask [3, length], row 1 right-padded from `right_from`, row 2 left-padded by 4; decoder ids
    and mask [3, 7] from the start token, row 1 right-padded from 4. Pads hold pad_id."""
    rng = np.random.default_rng(seed)
    ids, mask = rng.integers(low, 99, (3, length)), np.ones((3, length), np.int64)
    mask[1, right_from:], mask[2, :4] = 0, 0
    decoder_ids, decoder_mask = rng.integers(low, 99, (3, 7)), np.ones((3, 7), np.int64)
    decoder_mask[1, 4:] = 0
    decoder_ids[:, 0] = start_id
    return np.where(mask == 1, ids, pad_id), mask, np.where(decoder_mask == 1, decoder_ids, pad_id), decoder_mask


def torch_logits(model, ids, mask, types=None):
    """The PyTorch model's logits for NumPy inputs; segment ids only where given and the model takes them (DistilBERT
    and ModernBERT do not: ours must ignore what theirs never sees)."""
    kwargs = {}
    if types is not None and "token_type_ids" in inspect.signature(model.forward).parameters:
        kwargs["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs).logits.numpy()


def torch_seq2seq_logits(model, ids, mask, decoder_ids, decoder_mask):
    """An encoder-decoder PyTorch model's logits [B, T_dec, V] for NumPy inputs."""
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(decoder_ids),
                     decoder_attention_mask=torch.tensor(decoder_mask)).logits.numpy()


def assert_close(ours, theirs, mask=None, atol=1e-5):
    """ours == theirs to rtol 1e-5 and `atol`. With `mask` [B, T], token logits [B, T, V] are compared at the real
    tokens only (what a padded query computes is of no use, and implementations differ there); a classifier's
    [B, C] are compared whole."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    if mask is not None and theirs.ndim == 3:
        real = np.asarray(mask) == 1
        ours, theirs = ours[real], theirs[real]
    np.testing.assert_allclose(ours, theirs, atol=atol, rtol=1e-5)


def round_trip(model, params, hf_config, out, reference_path=None, auto=None):
    """Our save of perturbed params (so that the check does not lean on the load path) loads in PyTorch as
    `model.hf_architecture`, through `auto` (an AutoModelFor... class) if given, with nothing missing or unexpected;
    with `reference_path`, it holds the keys of transformers' own save there. -> (perturbed params, the PyTorch model
    loaded from our save, in eval mode): the caller checks that the two compute the same."""
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(x.dtype), params)
    hf_export.save_pretrained(str(out), params, hf_config, architecture=model.hf_architecture)
    if reference_path is not None:
        assert load_file(f"{out}/model.safetensors").keys() == load_file(f"{reference_path}/model.safetensors").keys()
    cls = auto or getattr(transformers, model.hf_architecture)
    loaded, info = cls.from_pretrained(out, output_loading_info=True)
    assert type(loaded).__name__ == model.hf_architecture and {k: v for k, v in info.items() if v} == {}
    return params, loaded.eval()


def assert_bf16_remat_and_dropout(config, head, batch, **options):
    """The model a training run builds for `head`, with remat and bfloat16 computation, on random params: its logits
    stay float32 and within 5% (of the largest) of float32's, and dropout follows the "dropout" rng (the same seed
    the same logits, another seed or none others). `options` go to every apply (e.g. positions=).
    -> (the float32 model, its params, the bfloat16 logits)."""
    _, model = create(config, head)
    params = {"params": random_params(model)}
    expected = jax.jit(functools.partial(model.apply, **options))(params, *batch)

    fast = create(config, head, dtype=jnp.bfloat16, gradient_checkpointing=True)[1]
    apply = jax.jit(functools.partial(fast.apply, **options), static_argnames="deterministic")
    logits = apply(params, *batch)
    assert logits.dtype == jnp.float32 and logits.shape == expected.shape
    assert float(jnp.abs(logits - expected).max()) < 0.05 * float(jnp.abs(expected).max())
    train = [apply(params, *batch, deterministic=False, rngs={"dropout": key(seed)}) for seed in (1, 1, 2)]
    np.testing.assert_array_equal(train[0], train[1])
    assert not np.allclose(train[0], train[2], atol=1e-2) and not np.allclose(train[0], logits, atol=1e-2)
    return model, params, logits


def assert_head_at_positions(model, batch, positions):
    """The MLM head at `positions` [B, K] (run_mlm_flax.py asks for the masked tokens' logits only) gives the full
    head's logits there (random params)."""
    params = {"params": random_params(model)}
    apply = jax.jit(model.apply)
    full = apply(params, *batch)
    picked = apply(params, *batch, positions=positions)
    assert picked.shape == (*positions.shape, model.config.vocab_size)
    np.testing.assert_allclose(picked, np.take_along_axis(np.asarray(full), positions[..., None], 1), atol=1e-5,
                               rtol=1e-5)


def param_count(model):
    """Our parameter count, from shapes only."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes(model)))


def torch_param_count(cls, hf_config):
    """The parameter count of transformers' `cls` (a model class or an AutoModel... class) for `hf_config`, built on
    the meta device (allocates nothing; tied weights are counted once)."""
    with torch.device("meta"):
        model = cls.from_config(hf_config) if cls.__name__.startswith("Auto") else cls(hf_config)
    return sum(p.numel() for p in model.parameters())
