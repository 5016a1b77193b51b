"""What one family alone does, against transformers' PyTorch models, on the tiny configs of test_parity.py's table:
generation token for token, its own tables (RoPE, ALiBi, sinusoids, buckets, random blocks), checkpoints of other
layouts (pickles, bare bodies, tied/untied, pretraining checkpoints under a fresh head), the training path (remat,
bfloat16, dropout), full-size parameter counts and the settings refused by name."""

import dataclasses
import functools
import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from transformers.cache_utils import DynamicCache, EncoderDecoderCache  # noqa: E402

from flaxtrain import generate, generate_seq2seq, hf_export, hf_io, parallel, training  # noqa: E402
from flaxtrain.models import (alibi, albert, big_bird, blenderbot, bloom, create, deberta_v2, distilbert,  # noqa: E402
                              electra, gemma, get_family, gpt2, gpt_neo, gptj, llama, longt5, marian, modernbert, opt,
                              pegasus, roberta_prelayernorm, roformer, rope, xglm)
from tests.parity import (assert_bf16_remat_and_dropout, assert_close, decoder_inputs, fresh_template, jit,  # noqa: E402
                          key, load_ours, param_count, param_shapes, random_params, seq2seq_inputs, torch_logits,
                          torch_model, torch_param_count, torch_seq2seq_logits)
from tests.test_generate import hf_greedy, prompts  # noqa: E402
from tests.test_parity import (CLM, CLS, LONGROPE, MLM, ROPE, ROWS, S2S, big_bird_inputs,  # noqa: E402
                               checkpoint, config)


def fresh_torch(path):
    """A newly loaded PyTorch model: dynamic RoPE keeps its grown base between calls, so never reuse one."""
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def inputs(name, **overrides):
    """The table's inputs of row `name` for an encoder."""
    return ROWS[name].inputs(config(name, **overrides), CLS)


# ------------------------------------------------------------------------------------------ decoders: generation
def opt_prompts():
    """[3, 6] left-padded prompts of 6, 4 and 1 tokens (pads hold 1, OPT/BLOOM/XGLM's pad)."""
    ids = np.random.default_rng(2).integers(5, 99, (3, 6))
    mask = np.ones_like(ids)
    mask[1, :2], mask[2, :5] = 0, 0
    return np.where(mask == 1, ids, 1), mask


@pytest.mark.parametrize("name,steps", [
    # GPT-Neo's window of 3 slots is shorter than every row's prompt + continuation.
    ("gpt_neo", 8), ("gptj", 8),
    # Phi-3's sequence passes its 8 original positions on the way, at the step where transformers drops its cache and
    # reruns the sequence with the long factors.
    ("qwen3", 10), ("phi3", 10),
    # Windows shorter than prompt + new tokens, with soft-capping.
    ("gemma2", 8), ("gemma3_text", 8),
    # OPT's positions and BLOOM's ALiBi counted over the cache's real slots, XGLM's positions as generate passes them.
    ("opt/350m", 8), ("bloom", 8), ("xglm", 8),
])
def test_greedy_generation_equals_transformers(name, steps, tmp_root):
    """Left-padded prompts of 6, 4 and 1 tokens through our key/value cache, token for token as transformers'
    greedy `generate`."""
    _, path, model, params = checkpoint(name, CLM, tmp_root)
    reference = fresh_torch(path)
    if config(name).pad_token_id == 1:
        ids, mask = opt_prompts()
        ours = np.asarray(generate.generate(model, params, ids, mask, max_new_tokens=steps, eos_token_id=2,
                                            pad_token_id=1))
        with torch.no_grad():
            out = reference.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                     max_new_tokens=steps, eos_token_id=2, pad_token_id=1).numpy()
        theirs = np.pad(out[:, ids.shape[1]:], ((0, 0), (0, steps - (out.shape[1] - ids.shape[1]))),
                        constant_values=1)
    else:
        ids, mask = prompts()
        ours = np.asarray(generate.generate(model, params, ids, mask, max_new_tokens=steps, eos_token_id=2))
        theirs = hf_greedy(reference, ids, mask, steps, 2)
    np.testing.assert_array_equal(ours, theirs)


def assert_cached_steps_equal_generate(reference, model, params, steps=6):
    """Our prefill and cached steps, fed transformers' greedy tokens, give the logits of its `generate` at every
    step (min_new_tokens: no row ends early). Prompts of 6, 4 and 1 tokens, left-padded."""
    ids, mask = prompts()
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=steps, min_new_tokens=steps, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
    new = out.sequences.numpy()[:, ids.shape[1]:]
    step = jax.jit(functools.partial(model.apply, {"params": params}))
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    logits, cache = step(ids, mask, positions, cache=model.init_cache(len(ids), ids.shape[1] + steps))
    got = [logits[:, -1]]
    for t in range(steps - 1):
        positions = positions[:, -1:] + 1
        logits, cache = step(new[:, t:t + 1], np.ones_like(positions), positions, cache=cache)
        got.append(logits[:, 0])
    expected = np.stack([x.numpy() for x in out.logits], 1)
    np.testing.assert_allclose(np.stack(got, 1), expected, atol=1e-5, rtol=1e-5)


# Generation crosses position 8: where dynamic and longrope switch.
SWITCH_AT_8 = {"llama/dynamic": dict(max_position_embeddings=8),
               "llama/longrope": dict(rope_parameters=dict(LONGROPE, original_max_position_embeddings=8)),
               "phi3": {}}


@pytest.mark.parametrize("name", list(SWITCH_AT_8))
def test_cached_steps_across_the_rope_switch_equal_transformers(name, tmp_root):
    """Positions pass 8 during generation, where the frequencies change: dynamic grows its base at each cached step
    past max_position_embeddings, longrope takes its long factors (Llama keeps its cache across the switch; Phi-3's
    transformers drops it at the step that reaches 9 slots and recomputes the earlier keys and values). The logits of
    every cached step equal those of transformers' `generate`, and greedy generation is its, token for token."""
    _, path, model, params = checkpoint(name, CLM, tmp_root, **SWITCH_AT_8[name])
    assert_cached_steps_equal_generate(fresh_torch(path), model, params)
    if name != "phi3":  # (phi3's greedy tokens: test_greedy_generation_equals_transformers)
        ids, mask = prompts()
        ours = np.asarray(generate.generate(model, params, ids, mask, max_new_tokens=10, eos_token_id=2))
        np.testing.assert_array_equal(ours, hf_greedy(fresh_torch(path), ids, mask, 10, 2))


# ------------------------------------------------------------------------------- decoders: tables and checkpoints
@pytest.mark.parametrize("name", ["default", "llama3", "linear", "dynamic", "yarn", "longrope"])
def test_rope_tables_equal_transformers(name):
    """cos/sin of every rope_type, below and past the original context, with partial rotary for longrope as Phi-3
    has it (the frequencies of the first half of each head)."""
    if name == "default":
        hf_config = transformers.AutoConfig.for_model("llama", **ROPE, rope_theta=300.0)
        module = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    elif name == "longrope":
        hf_config = transformers.AutoConfig.for_model(
            "phi3", **ROPE, partial_rotary_factor=0.5, original_max_position_embeddings=16,
            rope_parameters=dict(LONGROPE, short_factor=[1.0, 2.0], long_factor=[3, 5]))
        module = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding(hf_config)
    else:
        hf_config = config(f"llama/{name}")
        module = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    params = rope.rope_parameters(hf_config)
    for length in (10, 16, 17, 40):  # each a fresh module: transformers' dynamic state would carry over
        module.__init__(hf_config)
        positions = np.arange(length)[None]
        expected = module(torch.zeros(1, dtype=torch.float32), torch.tensor(positions))
        got = rope.rope_tables(jnp.asarray(positions), 8, params, hf_config.max_position_embeddings, jnp.float32)
        for x, y in zip(got, expected):
            np.testing.assert_allclose(np.asarray(x), y.numpy(), atol=2e-6, rtol=1e-5, err_msg=f"length {length}")


def test_alibi_slopes_and_xglm_positions_equal_transformers():
    """ALiBi slopes for every head count up to 160 (powers of two and not) as transformers' BLOOM (to one float32
    ulp: torch's float32 pow is not always correctly rounded), the bias from a padded mask as its; XGLM's sinusoids
    at positions up to 2048 as transformers' table, the pad row included (to 1e-6 at the first 64 positions; to
    2.5e-4 beyond: a frequency one float32 ulp apart moves the angle of position 2048 by up to ~1.2e-4)."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor
    from transformers.models.xglm.modeling_xglm import XGLMSinusoidalPositionalEmbedding

    for heads in range(1, 161):
        np.testing.assert_allclose(alibi.alibi_slopes(heads), _get_alibi_slopes(heads, "cpu").numpy(), rtol=1.2e-7,
                                   atol=0, err_msg=f"{heads} heads")
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    bias = np.asarray(alibi.alibi_bias(mask, 5))  # [B, N, 1, S]
    np.testing.assert_array_equal(bias[:, :, 0], build_alibi_tensor(torch.tensor(mask), 5, torch.float32)
                                  .reshape(2, 5, 5).numpy())

    for dim in (64, 1024):
        table = XGLMSinusoidalPositionalEmbedding.get_embedding(2050, dim, padding_idx=1).numpy()
        ours = np.asarray(xglm.sinusoidal_positions(np.arange(-1, 2048)[None], dim, 1, np.float32)[0])
        np.testing.assert_allclose(ours[:64], table[1:65], atol=1e-6)
        # Far positions: torch's float32 exp is a ulp off for a few frequencies, which moves their angles (below).
        np.testing.assert_allclose(ours, table[1:], atol=2.5e-4)


def test_gemma2_attention_softcap_and_window_matter():
    """The gemma2 row's attention cap and window change the logits (so that its parity checks them)."""
    reference = transformers.AutoModelForCausalLM.from_config(config("gemma2")).eval()
    ids, mask = decoder_inputs()
    base = torch_logits(reference, ids, mask)
    for change in ({"attn_logit_softcapping": None}, {"sliding_window": 64}):
        changed = transformers.AutoModelForCausalLM.from_config(config("gemma2", **change)).eval()
        changed.load_state_dict(reference.state_dict())
        assert np.abs(torch_logits(changed, ids, mask) - base)[mask.astype(bool)].max() > 1e-3, change


def assert_same_params(x, y):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_array_equal(a, b)


def gpt2_old_buffers(state):
    """An old-style GPT-2 pickle: the tied lm_head copy and the attn.bias mask buffers are in it, and are ignored."""
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    for i in range(2):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)


@pytest.mark.parametrize("name,head", [("roberta", MLM), ("gpt2", CLM)])
def test_pytorch_bin_checkpoint(name, head, tmp_root, tmp_path):
    """The old pickle format (tied decoder copies included) loads as the safetensors one."""
    reference, path, model, params = checkpoint(name, head, tmp_root)
    state = dict(reference.state_dict())
    if name == "gpt2":
        gpt2_old_buffers(state)
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_params(hf_io.load_pretrained(str(tmp_path), param_shapes(model), model_type=name),
                       hf_io.load_pretrained(path, param_shapes(model), model_type=name))


@pytest.mark.parametrize("name", ["opt", "bloom", "xglm"])
def test_bare_model_checkpoint_loads(name, tmp_root, tmp_path):
    """A checkpoint of the bare body (AutoModel: OPTModel's keys start at `decoder.`, BloomModel's at `h.`...) loads
    as the full one does (the tied head needs nothing more)."""
    reference, _, model, params = checkpoint(name, CLM, tmp_root)
    body = transformers.AutoModel.from_config(reference.config)
    body.load_state_dict(reference.base_model.state_dict())
    body.save_pretrained(tmp_path)
    assert_same_params(hf_io.load_pretrained(str(tmp_path), param_shapes(model), model_type=name), params)


def test_tied_and_untied_checkpoints(tmp_root):
    """An untied checkpoint does not load into a tied model (its lm_head differs from the embeddings); a tied one
    loads into an untied model, the embeddings filling lm_head."""
    _, untied_path, _, _ = checkpoint("mistral", CLM, tmp_root)
    template = param_shapes(create(config("mistral", tie_word_embeddings=True), CLM)[1])
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        hf_io.load_pretrained(untied_path, template, model_type="mistral")

    _, tied_path, _, _ = checkpoint("qwen2", CLM, tmp_root)
    template = param_shapes(create(config("qwen2", tie_word_embeddings=False), CLM)[1])
    params = hf_io.load_pretrained(tied_path, template, model_type="qwen2")
    np.testing.assert_array_equal(params["lm_head"]["kernel"], params["model"]["embed_tokens"]["embedding"].T)


def test_gpt_sw3_config_json_is_gpt2(tmp_root, tmp_path):
    """transformers maps "gpt-sw3" to GPT2Config and GPT2LMHeadModel. A config.json saying "gpt-sw3" (with
    GPT-SW3's Megatron leftovers, which GPT-2 ignores) loads with model_type "gpt-sw3" and makes our GPT-2, which
    loads the checkpoint, gives PyTorch's logits and exports what PyTorch loads."""
    reference, path, _, _ = checkpoint("gpt-sw3", CLM, tmp_root)
    saved = json.loads(open(os.path.join(path, "config.json")).read())
    for name in ("model.safetensors", "generation_config.json"):
        if os.path.exists(os.path.join(path, name)):
            os.symlink(os.path.join(path, name), tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({
        **saved, "model_type": "gpt-sw3", "apply_query_key_layer_scaling": True, "normalize_attention_scores": True,
        "tokenizer_class": "GPTSw3Tokenizer"}))
    sw3 = transformers.AutoConfig.from_pretrained(tmp_path)
    assert sw3.model_type == "gpt-sw3" and transformers.AutoConfig.for_model("gpt-sw3").model_type == "gpt2"
    family, model = create(sw3, CLM)
    assert family is gpt2.FAMILY and model.hf_architecture == "GPT2LMHeadModel"
    params = hf_io.load_pretrained(str(tmp_path), param_shapes(model), model_type="gpt-sw3")
    ids, mask = decoder_inputs()
    assert_close(jit(model.apply)({"params": params}, ids, mask), torch_logits(reference, ids, mask), mask)
    out = tmp_path / "export"
    hf_export.save_pretrained(str(out), params, sw3, architecture=model.hf_architecture)
    again, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(again) is transformers.GPT2LMHeadModel and {k: v for k, v in info.items() if v} == {}


@pytest.mark.parametrize("name", ["opt/350m", "bloom/post", "xglm", "gpt_neo", "gptj", "gptj/tied"])
def test_every_param_has_one_logical_name_per_dimension(name):
    """The logical axis names that parallel.shardings maps onto the mesh (models/partitioning.py)."""
    family, model = create(config(name), CLM)
    boxed = jax.eval_shape(functools.partial(family.init_params, model, unbox=False), key(0))
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    scanned = family.hf.scanned[0].replace(".", "/") + "/"
    for path, leaf in leaves:
        path = "/".join(k.key for k in path)
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= set(parallel.RULES), (path, leaf.names)
        assert (leaf.names[0] == "layers") == path.startswith(scanned), (path, leaf.names)


def test_gemma_training_path_with_dropout_remat_and_bf16():
    """What run_clm_flax's train step calls: attention dropout inside the capped softmax, remat, bfloat16; finite
    gradients, dropout drawn from the rng, and bf16 logits near float32's."""
    gemma_config = dataclasses.replace(gemma.GemmaConfig.from_hf(config("gemma2")), attention_dropout=0.3)
    model = gemma.GemmaForCausalLM(gemma_config, dtype=jnp.bfloat16, gradient_checkpointing=True)
    params = gemma.FAMILY.init_params(model, key(0))
    ids, _ = decoder_inputs()

    @jax.jit
    def loss_and_grads(params, rng):
        def loss(params):
            logits = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": rng})
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits
        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, first), grads = loss_and_grads(params, key(1))
    (_, second), _ = loss_and_grads(params, key(2))
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads)) and not np.allclose(first, second)
    bf16 = model.apply({"params": params}, ids)
    f32 = gemma.GemmaForCausalLM(gemma_config).apply({"params": params}, ids)
    np.testing.assert_allclose(bf16, f32, atol=0.15)


# ----------------------------------------------------------------------------------- encoders: checkpoints, heads
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_bert_mlm_checkpoint_into_classifier_needs_a_fresh_head(model_type, tmp_root):
    mlm, path, _, _ = checkpoint(model_type, MLM, tmp_root)
    family, classifier = create(mlm.config, CLS)
    template = fresh_template(classifier)
    with pytest.raises(ValueError, match=r"missing key\(s\):.*classifier\..*unexpected key\(s\):.*(cls|lm_head)\."):
        hf_io.load_pretrained(path, template, model_type=model_type)
    params = hf_io.load_pretrained(path, template, model_type=model_type, fresh=family.hf.classifier_head,
                                   drop=family.hf.pretraining_heads)
    assert all((x == 0.5).all() for x in jax.tree.leaves(params["classifier"]))
    body = hf_io.params_to_state_dict({model_type: params[model_type]}, scanned=family.hf.scanned)
    for name, value in body.items():
        if ".pooler." not in name:
            np.testing.assert_array_equal(value, mlm.state_dict()[name].numpy(), err_msg=name)


@pytest.mark.parametrize("name,architecture,loaded_pooler", [
    ("albert", "AlbertForMaskedLM", False),  # no pooler: a fresh one
    ("albert", "AlbertForPreTraining", True),  # the Hub's checkpoints: the pooler that sentence order trained
    ("roformer", "RoFormerForMaskedLM", False),
])
def test_albert_roformer_pretraining_checkpoint_loads_under_a_fresh_head(name, architecture, loaded_pooler,
                                                                         tmp_path):
    pretrained = torch_model(architecture, config(name))
    pretrained.save_pretrained(tmp_path)
    family, classifier = create(pretrained.config, CLS)
    template = fresh_template(classifier)
    with pytest.raises(ValueError, match=r"missing key\(s\):.*classifier\..*unexpected key\(s\):.*(predictions|cls)"):
        hf_io.load_pretrained(str(tmp_path), template, model_type=name)

    params = hf_io.load_pretrained(str(tmp_path), template, model_type=name, fresh=family.hf.classifier_head,
                                   drop=family.hf.pretraining_heads)
    assert all((x == 0.5).all() for x in jax.tree.leaves(params["classifier"]))
    if name == "albert":
        assert all((x == 0.5).all() != loaded_pooler for x in jax.tree.leaves(params["albert"]["pooler"]))
    body = hf_io.params_to_state_dict({name: params[name]}, scanned=family.hf.scanned, renamed=family.hf.renamed)
    theirs = {k: v.numpy() for k, v in pretrained.state_dict().items() if k.startswith(name + ".")}
    assert body.keys() == theirs.keys() | ({"albert.pooler.weight", "albert.pooler.bias"}
                                           if name == "albert" and not loaded_pooler else set())
    for key_name, value in theirs.items():
        np.testing.assert_array_equal(body[key_name], value, err_msg=key_name)


def test_albert_pretraining_checkpoint_into_masked_lm(tmp_path):
    """The Hub's ALBERT checkpoints are AlbertForPreTraining: with its sentence-order head and pooler dropped, our
    MLM computes its prediction logits."""
    pretrained = torch_model("AlbertForPreTraining", config("albert"))
    pretrained.save_pretrained(tmp_path)
    _, model = create(pretrained.config, MLM)
    params = hf_io.load_pretrained(str(tmp_path), param_shapes(model), model_type="albert",
                                   drop=(r"^sop_classifier\.", r"^albert\.pooler\."))
    ids, mask, types = inputs("albert")
    with torch.no_grad():
        theirs = pretrained(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            token_type_ids=torch.tensor(types)).prediction_logits.numpy()
    np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, ids, mask, types)[mask == 1],
                               theirs[mask == 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,architecture,head", [
    ("electra", "ElectraForPreTraining", "discriminator_predictions"),
    ("electra", "ElectraForMaskedLM", "generator_"),
    ("electra", "AutoModel", None),
    ("distilbert", "DistilBertForMaskedLM", "vocab_"),
    ("distilbert", "AutoModel", None),
])
def test_electra_distilbert_pretraining_checkpoint_loads_under_a_fresh_head(name, architecture, head, tmp_path):
    torch.manual_seed(0)
    cls = getattr(transformers, architecture)
    pretrained = (cls.from_config(config(name)) if architecture.startswith("Auto") else cls(config(name))).eval()
    pretrained.save_pretrained(tmp_path)
    family, classifier = create(pretrained.config, CLS)
    template = fresh_template(classifier)
    unexpected = rf".*unexpected key\(s\):.*{head}" if head else ""
    with pytest.raises(ValueError, match=rf"missing key\(s\):.*classifier\.{unexpected}"):
        hf_io.load_pretrained(str(tmp_path), template, model_type=name)

    params = hf_io.load_pretrained(str(tmp_path), template, model_type=name, fresh=family.hf.classifier_head,
                                   drop=family.hf.pretraining_heads)
    prefix = family.hf.base_prefix[name]
    assert set(params) == set(template) and all((x == 0.5).all() for part, subtree in params.items()
                                                if part != prefix for x in jax.tree.leaves(subtree))
    body = hf_io.params_to_state_dict({prefix: params[prefix]}, scanned=family.hf.scanned)
    theirs = {k if k.startswith(prefix + ".") else f"{prefix}.{k}": v.numpy()
              for k, v in pretrained.state_dict().items() if head is None or not k.startswith(head)}
    assert body.keys() == theirs.keys()
    for key_name, value in body.items():
        np.testing.assert_array_equal(value, theirs[key_name], err_msg=key_name)


@pytest.mark.parametrize("name,architecture,head", [
    ("xlm-roberta", "AutoModelForMaskedLM", r"lm_head\."),
    ("roberta-prelayernorm", "AutoModelForMaskedLM", r"lm_head\."),
    ("roberta-prelayernorm", "AutoModel", r"roberta_prelayernorm\.pooler\."),  # the bare model has a pooler
])
def test_roberta_variants_mlm_checkpoint_loads_under_a_fresh_classifier(name, architecture, head, tmp_path):
    torch.manual_seed(0)
    pretrained = getattr(transformers, architecture).from_config(config(name))
    pretrained.save_pretrained(tmp_path)
    family, classifier = create(pretrained.config, CLS)
    template = fresh_template(classifier)
    with pytest.raises(ValueError, match=rf"missing key\(s\):.*classifier\..*unexpected key\(s\):.*{head}"):
        hf_io.load_pretrained(str(tmp_path), template, model_type=name)

    params = hf_io.load_pretrained(str(tmp_path), template, model_type=name, fresh=family.hf.classifier_head,
                                   drop=family.hf.pretraining_heads)
    prefix = family.hf.base_prefix[name]
    assert set(params) == {prefix, "classifier"}
    assert all((x == 0.5).all() for x in jax.tree.leaves(params["classifier"]))
    body = hf_io.params_to_state_dict({prefix: params[prefix]}, scanned=family.hf.scanned)
    theirs = {k if k.startswith(prefix + ".") else f"{prefix}.{k}": v.numpy()
              for k, v in pretrained.state_dict().items() if not k.startswith("lm_head.")}
    theirs = {k: v for k, v in theirs.items() if not k.startswith(f"{prefix}.pooler.")}
    assert body.keys() == theirs.keys()
    for key_name, value in body.items():
        np.testing.assert_array_equal(value, theirs[key_name], err_msg=key_name)


@pytest.mark.parametrize("name,fresh", [
    ("modernbert", ("classifier",)),  # the MLM checkpoint's `head` has the classifier's names: loaded, as transformers
    ("deberta-v2", ("classifier", "pooler")),
])
def test_modernbert_deberta_mlm_checkpoint_loads_under_a_fresh_classifier(name, fresh, tmp_path):
    pretrained = torch_model({"modernbert": "ModernBertForMaskedLM", "deberta-v2": "DebertaV2ForMaskedLM"}[name],
                             config(name))
    pretrained.save_pretrained(tmp_path)
    family, classifier = create(pretrained.config, CLS)
    template = fresh_template(classifier)
    with pytest.raises(ValueError, match=r"missing key\(s\):.*classifier\..*unexpected key\(s\):.*(decoder|cls)"):
        hf_io.load_pretrained(str(tmp_path), template, model_type=name)

    params = hf_io.load_pretrained(str(tmp_path), template, model_type=name, fresh=family.hf.classifier_head,
                                   drop=family.hf.pretraining_heads)
    assert set(params) - set(fresh) == ({"model", "head"} if name == "modernbert" else {"deberta"})
    for part in fresh:
        assert all((x == 0.5).all() for x in jax.tree.leaves(params[part])), part
    loaded = hf_io.params_to_state_dict({k: v for k, v in params.items() if k not in fresh},
                                        scanned=family.hf.scanned, renamed=family.hf.renamed)
    theirs = {k: v.numpy() for k, v in pretrained.state_dict().items() if k in loaded}
    assert loaded.keys() == theirs.keys()
    for key_name, value in theirs.items():
        np.testing.assert_array_equal(loaded[key_name], value, err_msg=key_name)

    # The same classifier, as transformers builds it from that checkpoint, computes what ours computes.
    ours = np.asarray(jax.jit(classifier.apply)({"params": params}, *inputs(name)))
    reference = getattr(transformers, classifier.hf_architecture).from_pretrained(tmp_path).eval()
    state = hf_io.params_to_state_dict({k: v for k, v in params.items() if k in fresh})
    reference.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
    np.testing.assert_allclose(ours, torch_logits(reference, *inputs(name)), atol=1e-5, rtol=1e-5)


def test_deberta_v3_hub_checkpoint_layout(tmp_path):
    """The Hub's DeBERTa checkpoints keep the MLM head as `lm_predictions.lm_head` (which their configs, lacking
    `legacy`, do not use: transformers builds `cls.predictions` and leaves it fresh), DeBERTa-v3's its
    replaced-token-detection head `mask_predictions`, and some an unused absolute-position table. A classifier
    loads the body and drops the rest; an MLM with legacy=False loads lm_predictions."""
    import safetensors.numpy

    reference = torch_model("DebertaV2ForMaskedLM", config("deberta-v2", legacy=False))
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    state.update({"mask_predictions.dense.weight": np.ones((32, 32), np.float32),
                  "mask_predictions.classifier.bias": np.ones(1, np.float32),
                  "deberta.embeddings.position_embeddings.weight": np.ones((64, 32), np.float32)})
    safetensors.numpy.save_file(state, tmp_path / "model.safetensors")
    family, classifier = create(config("deberta-v2"), CLS)
    params = hf_io.load_pretrained(str(tmp_path), fresh_template(classifier), model_type="deberta-v2",
                                   fresh=family.hf.classifier_head, drop=family.hf.pretraining_heads)
    np.testing.assert_array_equal(params["deberta"]["encoder"]["rel_embeddings"]["embedding"],
                                  state["deberta.encoder.rel_embeddings.weight"])
    assert all((x == 0.5).all() for x in jax.tree.leaves((params["pooler"], params["classifier"])))

    _, model = create(reference.config, MLM)
    params = hf_io.load_pretrained(str(tmp_path), param_shapes(model), model_type="deberta-v2")
    ids, mask, types = inputs("deberta-v2")
    assert_close(jax.jit(model.apply)({"params": params}, ids, mask, types), torch_logits(reference, ids, mask, types),
                 mask)


@pytest.mark.parametrize("source,target,head,overrides,error", [
    (("bert", "BertForMaskedLM"), "roberta", MLM, {},
     r"missing key\(s\):.*roberta\.embeddings.*unexpected key\(s\): bert\."),
    (("bert", "BertForMaskedLM"), "bert", MLM, {"hidden_size": 48},
     r"shape mismatch\(es\): bert\.embeddings\.LayerNorm\.bias: expected \(48,\), found \(32,\)"),
    (("bert", "BertForMaskedLM"), "electra", CLS, {},
     r"missing key\(s\): electra\.embeddings.*unexpected key\(s\): bert\.embeddings"),
    (("electra", "ElectraForPreTraining"), "distilbert", CLS, {},
     r"missing key\(s\): distilbert\.embeddings.*unexpected key\(s\):.*electra\.embeddings"),
    (("electra", "ElectraForPreTraining"), "electra", CLS, {"embedding_size": 24},
     r"shape mismatch\(es\):.*electra\.embeddings\.word_embeddings\.weight: expected \(99, 24\), found \(99, 16\)"),
    (("distilbert", "DistilBertForMaskedLM"), "distilbert", CLS, {"dim": 48},
     r"shape mismatch\(es\): distilbert\.embeddings\.LayerNorm\.bias: expected \(48,\), found \(32,\)"),
])
def test_other_family_or_size_is_refused(source, target, head, overrides, error, tmp_path):
    torch_model(source[1], config(source[0])).save_pretrained(tmp_path)
    family, model = create(config(target, **overrides), head)
    rules = dict(fresh=family.hf.classifier_head, drop=family.hf.pretraining_heads) if head == CLS else {}
    with pytest.raises(ValueError, match=error):
        hf_io.load_pretrained(str(tmp_path), fresh_template(model), model_type=target, **rules)


@pytest.mark.parametrize("name,head,options", [
    ("albert", CLS, {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}),
    ("roformer", CLS, {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}),
    ("electra", CLS, {}), ("distilbert", CLS, {}),
    ("modernbert", CLS, {"attention_dropout": 0.1, "mlp_dropout": 0.1, "embedding_dropout": 0.1}),
    ("deberta-v2", CLS, {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}),
    ("roberta-prelayernorm", MLM, {}),  # the new pre-LN layer, logits at the masked positions
])
def test_gradient_checkpointing_bfloat16_and_dropout(name, head, options):
    """The model a training run builds: with remat and bfloat16 computation its logits stay float32 and close to
    float32's, and dropout (attention dropout included) follows the "dropout" rng; where the family has its own
    layer loop (ALBERT's shared layer, ModernBERT's, DeBERTa's), its gradients under remat are those without.
    (Remat's gradients under `bert.scan_layers`, which the others use, are checked in test_bert.py.)"""
    hf_config = config(name, **options)
    batch = inputs(name, **options)
    extra = {"positions": np.array([[1, 4], [2, 3], [0, 1]])} if head == MLM else {}
    model, params, logits = assert_bf16_remat_and_dropout(hf_config, head, batch, **extra)
    if head == MLM:
        assert logits.shape == (3, 2, hf_config.vocab_size)
    if name in ("albert", "modernbert", "deberta-v2"):
        remat = create(hf_config, head, gradient_checkpointing=True)[1]
        grad = lambda m: jax.jit(jax.grad(lambda p: m.apply(p, *batch).sum()))(params)  # noqa: E731
        for x, y in zip(jax.tree.leaves(grad(model)), jax.tree.leaves(grad(remat))):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


def test_roformer_sinusoidal_table_is_never_trained():
    """A step of AdamW with weight decay leaves the table as it was (zero gradient, not in the decay mask), while
    the weights around it move; the table is transformers' own."""
    _, model = create(config("roformer", num_hidden_layers=1), CLS)
    params = random_params(model)
    ids, mask, types = inputs("roformer")
    tx = training.make_optimizer(1e-2, weight_decay=0.1)

    @jax.jit
    def step(params):
        grads = jax.grad(lambda p: model.apply({"params": p}, ids, mask, types).sum())(params)
        return grads, tx.update(grads, tx.init(params), params)[0]

    grads, updates = step(params)
    assert not np.asarray(grads["roformer"]["encoder"]["embed_positions"]["weight"]).any()
    assert not np.asarray(updates["roformer"]["encoder"]["embed_positions"]["weight"]).any()
    assert np.asarray(updates["roformer"]["encoder"]["layer"]["attention"]["self"]["query"]["kernel"]).any()
    reference = transformers.models.roformer.modeling_roformer.RoFormerSinusoidalPositionalEmbedding(32, 8)
    np.testing.assert_array_equal(roformer.sinusoidal_table(32, 8), reference.create_weight().numpy())


@pytest.mark.parametrize("buckets,max_position", [(256, 512), (4, 64), (32, 100)])
def test_deberta_log_buckets_are_transformers(buckets, max_position):
    """Every distance of a 512-token input falls in transformers' bucket (float32 rounding at the boundaries)."""
    relative = np.arange(512)[:, None] - np.arange(512)[None, :]
    theirs = transformers.models.deberta_v2.modeling_deberta_v2.make_log_bucket_position(
        torch.tensor(relative), buckets, max_position).long().numpy()
    np.testing.assert_array_equal(deberta_v2.log_bucket_position(relative, buckets, max_position), theirs)


# ---------------------------------------------------------------------------------------------------- BigBird
def test_big_bird_masked_positions_and_padding_to_block_size(tmp_root):
    """62 tokens are padded to 64 inside the model (as transformers does); the MLM head at `positions=` (as
    run_mlm_flax.py calls it) gives the logits of those tokens."""
    reference, _, model, params = checkpoint("big_bird", MLM, tmp_root)
    batch = big_bird_inputs(62, seed=1)
    positions = np.array([[0, 7, 61], [3, 40, 47], [1, 2, 30]])
    logits = jax.jit(model.apply)({"params": params}, *batch, positions=positions)
    theirs = np.take_along_axis(torch_logits(reference, *batch), positions[..., None], axis=1)
    assert logits.shape == (3, 3, 99)
    np.testing.assert_allclose(logits, theirs, atol=1e-5 * max(1.0, np.abs(theirs).max()), rtol=1e-5)


def test_big_bird_training_mode_random_blocks(tmp_root):
    """In training transformers draws the random blocks with NumPy seeded by the layer index (in evaluation they are
    all block 0): with dropout off, our training-mode forward computes its training-mode logits, which differ from
    the evaluation ones."""
    reference, _, model, params = checkpoint("big_bird", MLM, tmp_root, hidden_dropout_prob=0.0,
                                             attention_probs_dropout_prob=0.0)
    batch = big_bird_inputs(64)
    train = jax.jit(functools.partial(model.apply, deterministic=False))({"params": params}, *batch)
    ROWS["big_bird"].assert_close(train, torch_logits(reference.train(), *batch), batch)
    evaluation = torch_logits(reference.eval(), *batch)
    assert np.abs(np.asarray(train) - evaluation).max() > 1e-2


@pytest.mark.parametrize("length,layer,block_size", [(64, 0, 4), (64, 1, 4), (48, 3, 4), (1024, 1, 16)])
def test_big_bird_random_blocks_equal_transformers(length, layer, block_size):
    """transformers' own code (1024 takes the paper's plan): the same blocks for each head. (Its split plan, for
    r + 5 < nb <= 2r + 5 blocks, fails in transformers itself and no input that runs block-sparse reaches it.)"""
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention

    hf_config = config("big_bird", block_size=block_size, num_random_blocks=3, max_position_embeddings=4096)
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
    reference, _, model, params = checkpoint("big_bird", CLS, tmp_root, num_labels=2)
    batch = big_bird_inputs(9)
    with caplog.at_level(logging.WARNING, logger="flaxtrain.models.big_bird"):
        logits = model.apply({"params": params}, *batch)
    assert "Changing attention type to 'original_full'" in caplog.text
    ROWS["big_bird"].assert_close(logits, torch_logits(reference, *batch), batch)
    assert reference.bert.attention_type == "original_full"  # transformers switched, for good


# --------------------------------------------------------------------------------------------- encoder-decoders
@pytest.mark.parametrize("name", ["t5", "mt5"])  # v1.1 runs mT5's code with the same weights
def test_t5_greedy_generation_matches_transformers(name, tmp_root):
    reference, _, model, params = checkpoint(name, S2S, tmp_root)
    ids, mask, _, _ = seq2seq_inputs(low=2, start_id=0, pad_id=0, seed=2)
    free = np.asarray(generate_seq2seq.greedy_search(model, params, ids, mask, max_new_tokens=10, eos_token_id=()))
    # As end-of-sequence, the token that appears last for the first time in a row: that row must stop there and be
    # padded after it. (The tied v1.0 head soon repeats one token; mT5's rows vary.)
    row, pos = max(((r, p) for r in range(3) for p in range(10) if free[r, p] not in free[r, :p]),
                   key=lambda rp: (rp[1], -rp[0]))
    eos = int(free[row, pos])
    tokens = np.asarray(generate_seq2seq.greedy_search(model, params, ids, mask, max_new_tokens=10, eos_token_id=eos))
    with torch.no_grad():
        # An explicit cache: transformers sizes its default one by the encoder's layer count.
        expected = reference.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, num_beams=1,
            max_new_tokens=10, decoder_start_token_id=0, eos_token_id=eos, pad_token_id=0,
            past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache())).numpy()
    assert (expected[:, 0] == 0).all()  # transformers' output starts with the decoder start token; ours does not
    expected = np.pad(expected[:, 1:], ((0, 0), (0, 10 + 1 - expected.shape[1])))  # it stops when all rows have
    np.testing.assert_array_equal(tokens, expected)
    assert tokens[row, pos] == eos and (tokens[row, pos + 1:] == 0).all()
    assert name == "t5" or pos >= 3


def test_t5_cached_decoding_equals_uncached(tmp_root):
    """Teacher-forced: the decoder fed through the cache one token, then two, then one at a time computes the
    logits of the uncached causal pass."""
    _, _, model, params = checkpoint("t5", S2S, tmp_root)
    ids, mask, decoder_ids, _ = seq2seq_inputs(low=2, start_id=0, pad_id=0)
    expected = jax.jit(model.apply)({"params": params}, ids, mask, decoder_ids)
    encoder_hidden = model.apply({"params": params}, ids, mask, method=model.encode)
    decode = jax.jit(functools.partial(model.apply, method=model.decode))
    cache = model.init_cache(ids.shape[0], decoder_ids.shape[1])
    pieces, hidden = [], encoder_hidden
    for start, stop in [(0, 1), (1, 3), *((t, t + 1) for t in range(3, 7))]:
        logits, cache = decode({"params": params}, decoder_ids[:, start:stop], hidden, mask, cache=cache)
        pieces.append(logits)
        hidden = None  # the cross-attention keys/values now come from the cache
    assert int(cache["index"]) == 7 and cache["cross"]["key"].shape == (2, 3, 9, 4, 8)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), expected, atol=1e-5 * np.abs(expected).max())


def test_t5_checkpoint_saved_tied_loads_into_untied_head(tmp_root, tmp_path):
    """transformers 5 ties a fresh mT5's (and T5 v1.1's) lm_head to `shared` and saves no lm_head.weight; our
    untied model copies it from `shared` and computes what the PyTorch model does."""
    torch.manual_seed(1)
    reference = transformers.MT5ForConditionalGeneration(config("mt5")).eval()
    reference.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    _, _, model, template = checkpoint("mt5", S2S, tmp_root)
    params = hf_io.load_pretrained(str(tmp_path), template, model_type="mt5")
    np.testing.assert_array_equal(params["lm_head"]["kernel"], params["shared"]["embedding"].T)
    batch = seq2seq_inputs(low=2, start_id=0, pad_id=0)
    ROWS["mt5"].assert_close(jax.jit(model.apply)({"params": params}, *batch), torch_seq2seq_logits(reference, *batch),
                             batch)


GENERATION_STEPS = 12


@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("name", ["longt5", "longt5/tglobal"])
def test_longt5_generation_matches_transformers(name, num_beams, tmp_path):
    """Greedy and 4-beam search of flaxtrain/generate_seq2seq.py, token for token as transformers' generate, on a
    small vocabulary where rows end at different lengths."""
    hf_config = config(name, vocab_size=24, num_decoder_layers=3)
    torch.manual_seed(0)
    reference = transformers.LongT5ForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for param_name, p in reference.named_parameters():
            if "layer_norm" in param_name:
                p.uniform_(0.5, 1.5)
        reference.lm_head.weight = torch.nn.Parameter(torch.randn(hf_config.vocab_size, hf_config.d_model))
        reference.lm_head.weight[hf_config.eos_token_id] *= 1.6  # rows end at several lengths,
        reference.lm_head.weight[hf_config.pad_token_id] = 0.0  # and the pad token is never generated
    reference.save_pretrained(tmp_path)
    model, params = load_ours(hf_config, S2S, tmp_path)
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


def test_bare_bart_model_checkpoint_loads_with_zero_logits_bias(tmp_root, tmp_path):
    """A `BartModel` checkpoint (AutoModel: no `model.` prefix, no final_logits_bias) loads into an eval_shape'd
    template: the body as in the full checkpoint, final_logits_bias zeros (as transformers initialises it)."""
    reference, _, model, params = checkpoint("bart", S2S, tmp_root)
    body = transformers.BartModel(reference.config)
    body.load_state_dict(reference.model.state_dict())
    body.save_pretrained(tmp_path)
    assert not any(k.startswith("model.") or k == "final_logits_bias"
                   for k in load_file(str(tmp_path / "model.safetensors")))
    loaded = hf_io.load_pretrained(str(tmp_path), param_shapes(model), model_type="bart")
    np.testing.assert_array_equal(loaded["final_logits_bias"], np.zeros((1, 99), np.float32))
    assert_same_params(loaded["model"], params["model"])


def test_bart_classifier_from_a_conditional_generation_checkpoint_gets_a_fresh_head(tmp_root):
    """A BartForConditionalGeneration checkpoint under run_flax_glue.py's rules: the body loads, its
    final_logits_bias is left out, classification_head keeps the template's (fresh) values; without the rules the
    head is missing and final_logits_bias unexpected."""
    pretrained, path, _, _ = checkpoint("bart", S2S, tmp_root)
    family, classifier = create(config("bart"), CLS)
    template = fresh_template(classifier)
    with pytest.raises(ValueError, match=r"missing key\(s\): classification_head.*unexpected key\(s\): final_logits"):
        hf_io.load_pretrained(path, template, model_type="bart")
    params = hf_io.load_pretrained(path, template, model_type="bart", fresh=family.hf.classifier_head,
                                   drop=family.hf.pretraining_heads)
    assert set(params) == {"model", "classification_head"}
    assert all((x == 0.5).all() for x in jax.tree.leaves(params["classification_head"]))
    body = hf_io.params_to_state_dict({"model": params["model"]}, scanned=family.hf.scanned)
    theirs = {k: v.numpy() for k, v in pretrained.state_dict().items() if k.startswith("model.")}
    assert body.keys() <= theirs.keys()
    for name, value in body.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)


def masked_batch(vocab_size, mask_id, seed=0):
    """Original ids [4, 12] (row 2 right-padded), 15% of the real non-special tokens replaced by mask_id;
    (input_ids, attention_mask, positions [4, K], labels, weights) in run_mlm_flax.py's layout."""
    rng = np.random.default_rng(seed)
    ids, mask = rng.integers(4, vocab_size - 1, (4, 12)), np.ones((4, 12), np.int64)
    ids[:, 0], ids[:, -1] = 0, 2
    mask[2, 8:] = 0
    ids[2, 7] = 2
    ids = np.where(mask == 1, ids, 1)
    chosen = (rng.random(ids.shape) < 0.25) & (ids > 3)
    positions = np.argsort(~chosen, axis=1, kind="stable")[:, :5]
    weights = np.take_along_axis(chosen, positions, 1).astype(np.float32)
    return (np.where(chosen, mask_id, ids), mask, positions, np.take_along_axis(ids, positions, 1), weights)


@pytest.mark.parametrize("name", ["bart", "mbart"])
def test_bart_masked_lm_loss_equals_transformers(name, tmp_root):
    """BART's MaskedLM (run_mlm_flax.py) against transformers' conditional-generation model given only the masked
    input_ids (its model shifts them into the decoder input, mBART its own way): its logits at the masked tokens,
    and its cross-entropy over them equals our loss."""
    reference, path, _, _ = checkpoint(name, S2S, tmp_root)
    _, model = create(reference.config, MLM)
    assert model.hf_architecture == type(reference).__name__
    params = hf_io.load_pretrained(path, param_shapes(model), model_type=name)
    ids, mask, positions, labels, weights = masked_batch(99, mask_id=98)
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    picked = torch.gather(logits, 1, torch.tensor(positions)[..., None].expand(-1, -1, logits.shape[-1]))
    losses = torch.nn.functional.cross_entropy(picked.transpose(1, 2), torch.tensor(labels), reduction="none")
    expected = float((losses * torch.tensor(weights)).sum() / weights.sum())

    ours = jit(model.apply)({"params": params}, ids, mask, positions=positions)
    assert ours.shape == (4, 5, 99)
    np.testing.assert_allclose(np.asarray(ours)[weights > 0], picked.numpy()[weights > 0],
                               atol=1e-5 * float(picked.abs().max()), rtol=1e-5)
    loss_sum, _, weight = training.cross_entropy_sums(ours, labels, weights)
    assert float(loss_sum / weight) == pytest.approx(expected, rel=1e-5)


BART_VARIANTS = ("pegasus", "marian", "blenderbot", "blenderbot-small")
STEPS = 8


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


@pytest.mark.parametrize("name", BART_VARIANTS)
def test_bart_variants_greedy_and_beam_search_match_transformers_generate(name, tmp_root):
    """As end-of-sequence, a token that first appears late in some row of transformers' unconstrained greedy
    output (so that rows end at different lengths); then greedy and 4-beam search, token for token."""
    reference, _, model, params = checkpoint(name, S2S, tmp_root)
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
    reference, _, model, params = checkpoint("pegasus", S2S, tmp_root)
    theirs = reference.model.encoder.embed_positions.weight.detach().numpy()
    np.testing.assert_array_equal(params["model"]["encoder"]["embed_positions"]["weight"], theirs)
    fresh = nn.unbox(marian.SinusoidalPositions(model.config, saved=True).init(key(0), np.arange(3)))  # as init'd
    np.testing.assert_array_equal(fresh["params"]["weight"], theirs)
    for positions, dim in ((20, 32), (7, 33)):
        table = transformers.models.marian.modeling_marian.MarianSinusoidalPositionalEmbedding(positions, dim)
        np.testing.assert_array_equal(marian.sinusoidal_table(positions, dim), table.create_weight().numpy())
    assert "embed_positions" not in checkpoint("marian", S2S, tmp_root)[3]["model"]["encoder"]

    layouts = {t: create(config(t), S2S)[1].config for t in BART_VARIANTS}
    fields = ("normalize_before", "add_final_layer_norm", "layernorm_embedding", "decoder_norms_tokens",
              "learned_positions", "position_offset")
    assert {t: tuple(getattr(c, f) for f in fields) for t, c in layouts.items()} == {
        "pegasus": (True, True, False, False, False, 0), "marian": (False, False, False, False, False, 0),
        "blenderbot": (True, True, False, False, True, 0), "blenderbot-small": (False, False, True, True, True, 0)}


# ------------------------------------------------------------------------------------------ full-size param counts
def saved_tables_and_logits_bias(hf_config):
    """transformers' parameters() hold the frozen sinusoidal tables and not the final_logits_bias buffer; ours hold
    final_logits_bias, and the tables only where checkpoints carry them (Pegasus)."""
    unsaved = 2 * hf_config.max_position_embeddings * hf_config.d_model if hf_config.model_type == "marian" else 0
    return hf_config.vocab_size - unsaved


def untied_lm_head(hf_config):
    """transformers 5 ties LongT5's lm_head at init; the checkpoints hold their own."""
    return hf_config.vocab_size * hf_config.d_model


# name -> (model_type, the real config's values (written here: no network), {head: count or (low, high)} (None:
# every head of the family), a correction to transformers' count)
FULL_SIZE = {
    "Llama-3.2-1B": ("llama", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192)), {CLM: 1_235_814_400}, None),
    "gemma-2b": ("gemma", dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                               num_attention_heads=8, num_key_value_heads=1, head_dim=256), None, None),
    "gemma-2-2b": ("gemma2", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                  query_pre_attn_scalar=256, sliding_window=4096), None, None),
    "gemma-3-1b": ("gemma3_text", dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                                       num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                                       head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                                       rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                                       max_position_embeddings=32768), None, None),
    "Qwen3-0.6B": ("qwen3", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                                 max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                 bos_token_id=151643, eos_token_id=151645), {CLM: 596_049_920}, None),
    "Phi-3-mini-4k-instruct": ("phi3", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096,
        rms_norm_eps=1e-5, sliding_window=2047, tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000,
        pad_token_id=32000), {CLM: 3_821_079_552}, None),
    "opt-1.3b": ("opt", dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                             vocab_size=50272, max_position_embeddings=2048), {CLM: 1_315_758_080}, None),
    "opt-350m": ("opt", dict(hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16,
                             vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=False,
                             word_embed_proj_dim=512), {CLM: 331_196_416}, None),
    "bloom-560m": ("bloom", dict(hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880), {CLM: 559_214_592},
                   None),
    "xglm-564M": ("xglm", dict(d_model=1024, ffn_dim=4096, num_layers=24, attention_heads=16, vocab_size=256008,
                               max_position_embeddings=2048), {CLM: 564_463_616}, None),
    "gpt-neo-1.3B": ("gpt_neo", dict(hidden_size=2048, num_layers=24, num_heads=16, window_size=256,
                                     attention_types=[[["global", "local"], 12]], vocab_size=50257,
                                     max_position_embeddings=2048, activation_function="gelu_new"), None, None),
    "gpt-j-6b": ("gptj", dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400, n_positions=2048,
                              activation_function="gelu_new", tie_word_embeddings=False), None, None),
    # ALBERT-base's 12M: one layer's weights, shared.
    "albert-base-v2": ("albert", dict(vocab_size=30000, embedding_size=128, hidden_size=768, num_hidden_layers=12,
                                      num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                                      type_vocab_size=2, hidden_act="gelu_new"),
                       {MLM: (11_000_000, 12_000_000), CLS: None}, None),
    # RoFormer's frozen sinusoidal table counts on both sides: PyTorch keeps it as a Parameter, we as a param.
    "roformer_chinese_base": ("roformer", dict(vocab_size=50000, embedding_size=768, hidden_size=768,
                                               num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                               max_position_embeddings=1536, type_vocab_size=2, hidden_act="gelu"),
                              None, None),
    "ModernBERT-base": ("modernbert", dict(
        vocab_size=50368, hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152,
        max_position_embeddings=8192, global_attn_every_n_layers=3, local_attention=128, global_rope_theta=160000.0,
        local_rope_theta=10000.0, norm_bias=False, attention_bias=False, mlp_bias=False, classifier_pooling="mean",
        hidden_activation="gelu", pad_token_id=50283), {MLM: (149_000_000, 150_000_000), CLS: None}, None),
    # The published 184M: 86M body + 98M embeddings.
    "deberta-v3-base": ("deberta-v2", dict(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=512, type_vocab_size=0, relative_attention=True, position_buckets=256,
        pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
        max_relative_positions=-1, layer_norm_eps=1e-7, hidden_act="gelu", pooler_hidden_size=768, pooler_dropout=0,
        pooler_hidden_act="gelu"), {MLM: (184_000_000, 185_000_000), CLS: None}, None),
    "xlm-roberta-base": ("xlm-roberta", dict(vocab_size=250002, max_position_embeddings=514, type_vocab_size=1,
                                             pad_token_id=1, layer_norm_eps=1e-5), None, None),
    "roberta-base-sized pre-LN": ("roberta-prelayernorm", dict(vocab_size=50265, max_position_embeddings=514,
                                                               type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5),
                                  None, None),
    "electra-small-generator": ("electra", dict(embedding_size=128, hidden_size=256, num_hidden_layers=12,
                                                num_attention_heads=4, intermediate_size=1024, vocab_size=30522,
                                                max_position_embeddings=512, type_vocab_size=2), None, None),
    "distilbert-base-uncased": ("distilbert", dict(vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072,
                                                   max_position_embeddings=512), None, None),
    # The pooler included, which every transformers head has.
    "bigbird-roberta-base": ("big_bird", dict(vocab_size=50358, hidden_size=768, num_hidden_layers=12,
                                              num_attention_heads=12, intermediate_size=3072,
                                              max_position_embeddings=4096, type_vocab_size=2),
                             {MLM: 128_111_286, CLS: None}, None),
    "long-t5-tglobal-base": ("longt5", dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                                            num_decoder_layers=12, num_heads=12, feed_forward_proj="gated-gelu",
                                            tie_word_embeddings=False, encoder_attention_type="transient-global"),
                             {S2S: 247_587_456}, untied_lm_head),
    "long-t5-local-base": ("longt5", dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                                          num_decoder_layers=12, num_heads=12, feed_forward_proj="gated-gelu",
                                          tie_word_embeddings=False, encoder_attention_type="local"), None,
                           untied_lm_head),
    "pegasus-large": ("pegasus", dict(d_model=1024, encoder_layers=16, decoder_layers=16, encoder_attention_heads=16,
                                      decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
                                      vocab_size=96103, max_position_embeddings=1024), None,
                      saved_tables_and_logits_bias),
    "opus-mt-en-de": ("marian", dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                                     decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                                     vocab_size=58101, max_position_embeddings=512, pad_token_id=58100,
                                     decoder_start_token_id=58100), None, saved_tables_and_logits_bias),
    "blenderbot-400M-distill": ("blenderbot", dict(
        d_model=1280, encoder_layers=2, decoder_layers=12, encoder_attention_heads=32, decoder_attention_heads=32,
        encoder_ffn_dim=5120, decoder_ffn_dim=5120, vocab_size=8008, max_position_embeddings=128), None,
        saved_tables_and_logits_bias),
    "blenderbot_small-90M": ("blenderbot-small", dict(
        d_model=512, encoder_layers=8, decoder_layers=8, encoder_attention_heads=16, decoder_attention_heads=16,
        encoder_ffn_dim=2048, decoder_ffn_dim=2048, vocab_size=54944, max_position_embeddings=512), None,
        saved_tables_and_logits_bias),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_parameter_count(name):
    """Shapes only (built on the meta device on their side): every head's count equals the transformers PyTorch
    model's (tied weights counted once), and the published size where given."""
    model_type, settings, expected, correction = FULL_SIZE[name]
    hf_config = transformers.AutoConfig.for_model(model_type, **settings)
    heads = get_family(model_type).heads if expected is None else expected
    for head in heads:
        model = create(hf_config, head)[1]
        theirs = torch_param_count(getattr(transformers, model.hf_architecture), hf_config)
        if correction is not None:
            theirs += correction(hf_config)
        assert param_count(model) == theirs, (name, head)
        count = (expected or {}).get(head)
        if isinstance(count, tuple):
            assert count[0] < theirs < count[1], (name, head, theirs)
        elif count is not None:
            assert theirs == count, (name, head, theirs)


# ------------------------------------------------------------------------------------- configs and their refusals
def test_decoder_configs_refuse_what_they_do_not_implement():
    for_model = transformers.AutoConfig.for_model
    with pytest.raises(ValueError, match="rope_type 'su_scaled'"):
        llama.LlamaConfig.from_hf(for_model("llama", rope_parameters={"rope_type": "su_scaled", "factor": 2.0}))
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5"):
        llama.LlamaConfig.from_hf(for_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                      "partial_rotary_factor": 0.5}))
    with pytest.raises(ValueError, match="rope_type 'linear'"):
        get_family("phi3").config(rope_parameters=(("factor", 2.0), ("rope_type", "linear")))
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        gemma.GemmaConfig.from_hf(for_model("gemma3_text", use_bidirectional_attention=True))
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5"):
        gemma.GemmaConfig.from_hf(for_model("gemma2", partial_rotary_factor=0.5))
    with pytest.raises(ValueError, match="rope_type 'mrope'"):
        gemma.GemmaConfig.from_hf(for_model(
            "gemma3_text", rope_parameters={"full_attention": {"rope_type": "mrope", "rope_theta": 1.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 1.0}}))
    with pytest.raises(ValueError, match="layerdrop=0.1"):
        opt.OPTConfig.from_hf(transformers.OPTConfig(layerdrop=0.1))
    with pytest.raises(ValueError, match="add_cross_attention=True"):
        xglm.XGLMConfig.from_hf(transformers.XGLMConfig(add_cross_attention=True))
    assert not opt.OPTConfig.from_hf(transformers.OPTConfig(_remove_final_layer_norm=True)).final_layer_norm
    assert bloom.BloomConfig.from_hf(transformers.BloomConfig()).seq_length == bloom.TRAINING_LENGTH
    neo = config("gpt_neo")
    neo.attention_layers = ["global", "sparse", "local"]
    with pytest.raises(ValueError, match=r"attention_layers \['sparse'\]"):
        gpt_neo.GPTNeoConfig.from_hf(neo)
    with pytest.raises(ValueError, match="rotary_dim None is not supported"):
        gptj.GPTJConfig(n_embd=32, n_head=4, rotary_dim=None)
    with pytest.raises(ValueError, match="rotary_dim 10 is not supported"):
        gptj.GPTJConfig(n_embd=32, n_head=4, rotary_dim=10)
    model = gpt_neo.GPTNeoForCausalLM(gpt_neo.GPTNeoConfig.from_hf(config("gpt_neo")))
    with pytest.raises(ValueError, match="more than GPT-Neo's 32 positions"):
        model.init_cache(1, 33)


def test_encoder_configs_from_hf_and_refusals():
    albert_config = albert.AlbertConfig.from_hf(config("albert", classifier_dropout_prob=0.3))
    assert (albert_config.embedding_size, albert_config.hidden_size, albert_config.classifier_dropout_prob) == (
        16, 32, 0.3)
    assert albert_config.hidden_act == "gelu_new" and get_family("albert") is albert.FAMILY
    assert albert.FAMILY.max_positions(albert_config) == 32
    for name in ("num_hidden_groups", "inner_group_num"):
        with pytest.raises(ValueError, match=f"{name}=2"):
            albert.AlbertConfig.from_hf(config("albert", **{name: 2}))
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        albert.AlbertConfig.from_hf(config("albert", tie_word_embeddings=False))

    roformer_config = roformer.RoFormerConfig.from_hf(config("roformer", rotary_value=True, embedding_size=None))
    assert (roformer_config.embedding_width, roformer_config.rotary_value,
            roformer_config.max_position_embeddings) == (32, True, 32)
    assert roformer.FAMILY.max_positions(roformer_config) == 32 and get_family("roformer") is roformer.FAMILY
    with pytest.raises(ValueError, match="is_decoder=True"):
        roformer.RoFormerConfig.from_hf(config("roformer", is_decoder=True))
    with pytest.raises(ValueError, match="head size 5.*odd"):
        roformer.RoFormerConfig.from_hf(config("roformer", hidden_size=20))

    electra_config = electra.ElectraConfig.from_hf(config("electra", classifier_dropout=0.3))
    assert (electra_config.embedding_size, electra_config.hidden_size, electra_config.classifier_dropout) == (
        16, 32, 0.3)
    assert electra.FAMILY.max_positions(electra_config) == 32 and get_family("electra") is electra.FAMILY
    same_width = electra.ElectraForSequenceClassification(
        electra.ElectraConfig.from_hf(config("electra", embedding_size=32)))
    # As transformers: only when the widths differ.
    assert "embeddings_project" not in param_shapes(same_width)["electra"]
    with pytest.raises(ValueError, match="is_decoder=True"):
        electra.ElectraConfig.from_hf(config("electra", is_decoder=True))
    with pytest.raises(ValueError, match="'bert' is not one of ElectraConfig's"):
        electra.ElectraConfig(model_type="bert")
    with pytest.raises(ValueError, match="model_type 'electra' is not supported for this task"):
        create(config("electra"), CLM)

    distil = distilbert.DistilBertConfig.from_hf(config("distilbert", seq_classif_dropout=0.3, activation="relu"))
    assert (distil.dim, distil.hidden_size, distil.n_layers, distil.seq_classif_dropout, distil.activation) == (
        32, 32, 2, 0.3, "relu")
    assert distilbert.max_positions(distil) == 32 and get_family("distilbert") is distilbert.FAMILY
    with pytest.raises(ValueError, match="sinusoidal_pos_embds=True"):
        distilbert.DistilBertConfig.from_hf(config("distilbert", sinusoidal_pos_embds=True))
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        distilbert.DistilBertConfig.from_hf(config("distilbert", tie_word_embeddings=False))

    pre_ln = roberta_prelayernorm.RobertaPreLayerNormConfig.from_hf(config("roberta-prelayernorm"))
    assert (pre_ln.model_type, pre_ln.pad_token_id, pre_ln.is_roberta) == ("roberta-prelayernorm", 1, True)
    assert get_family("roberta-prelayernorm").max_positions(pre_ln) == 30  # fairseq positions start at pad + 1
    with pytest.raises(ValueError, match="is_decoder=True"):
        roberta_prelayernorm.RobertaPreLayerNormConfig.from_hf(config("roberta-prelayernorm", is_decoder=True))
    family, model = create(config("xlm-roberta"), MLM)
    assert family is get_family("roberta") and family.max_positions(model.config) == 30

    modern = modernbert.ModernBertConfig.from_hf(config("modernbert", global_attn_every_n_layers=3))
    assert modern.layer_types == ("full_attention", "sliding_attention", "sliding_attention", "full_attention")
    assert dict(modern.global_rope)["rope_theta"] == 500.0 and dict(modern.local_rope)["rope_theta"] == 10000.0
    assert get_family("modernbert") is modernbert.FAMILY and modernbert.FAMILY.max_positions(modern) == 64
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        modernbert.ModernBertConfig.from_hf(config("modernbert", tie_word_embeddings=False))
    with pytest.raises(ValueError, match="classifier_pooling 'max'"):
        modernbert.ModernBertConfig(classifier_pooling="max")
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        modernbert.ModernBertConfig.from_hf(config("modernbert", rope_scaling={"rope_type": "dynamic",
                                                                               "factor": 2.0}))

    deberta = deberta_v2.DebertaV2Config.from_hf(config("deberta-v2"))
    assert (deberta.pos_att_type, deberta.span, deberta.max_relative, deberta.legacy) == (("p2c", "c2p"), 4, 64, True)
    assert get_family("deberta-v2") is deberta_v2.FAMILY and deberta_v2.FAMILY.max_positions(deberta) == 64
    # transformers' defaults for the attributes its config class leaves undeclared: DeBERTa-v2 without them.
    bare = deberta_v2.DebertaV2Config.from_hf(transformers.DebertaV2Config())
    assert (bare.relative_attention, bare.share_att_key, bare.position_buckets, bare.pos_att_type,
            bare.norm_rel_ebd, bare.position_biased_input) == (False, False, -1, (), "none", True)
    for name, value in (("conv_kernel_size", 3), ("pooler_hidden_size", 16), ("tie_word_embeddings", False)):
        with pytest.raises(ValueError, match=f"{name}={value}"):
            deberta_v2.DebertaV2Config.from_hf(config("deberta-v2", **{name: value}))
    with pytest.raises(ValueError, match="pos_att_type.*p2p"):
        deberta_v2.DebertaV2Config.from_hf(config("deberta-v2", pos_att_type="p2c|p2p"))

    with pytest.raises(ValueError, match="attention_type 'sparse'"):
        big_bird.BigBirdConfig(attention_type="sparse")
    with pytest.raises(ValueError, match="is_decoder"):
        big_bird.BigBirdConfig.from_hf(config("big_bird", is_decoder=True))


def test_seq2seq_configs_refusals_and_defaults():
    with pytest.raises(ValueError, match="encoder_attention_type 'global'"):
        longt5.LongT5Config(encoder_attention_type="global")
    with pytest.raises(ValueError, match="is_decoder"):
        longt5.LongT5Config.from_hf(config("longt5", is_decoder=True))
    with pytest.raises(ValueError, match="share_encoder_decoder_embeddings=False"):
        marian.MarianConfig.from_hf(transformers.AutoConfig.for_model(
            "marian", share_encoder_decoder_embeddings=False, decoder_vocab_size=500))
    with pytest.raises(ValueError, match="decoder_vocab_size=500"):
        marian.MarianConfig.from_hf(transformers.AutoConfig.for_model("marian", decoder_vocab_size=500))
    with pytest.raises(ValueError, match="encoder_layerdrop > 0"):
        create(transformers.AutoConfig.for_model("pegasus", encoder_layerdrop=0.1), S2S)
    with pytest.raises(ValueError, match="'pegasus' is not one of MarianConfig's"):
        marian.MarianConfig(model_type="pegasus")
    with pytest.raises(ValueError, match="model_type 'pegasus' is not supported for this task"):
        create(transformers.AutoConfig.for_model("pegasus"), CLS)
    opus = marian.MarianConfig.from_hf(transformers.AutoConfig.for_model("marian"))
    assert (opus.pad_token_id, opus.decoder_start_token_id, opus.eos_token_id, opus.bos_token_id) == (
        58100, 58100, 0, None)
    large = pegasus.PegasusConfig.from_hf(transformers.AutoConfig.for_model("pegasus"))
    assert (large.decoder_start_token_id, large.pad_token_id, large.forced_eos_token_id) == (0, 0, 1)
    assert blenderbot.BlenderbotConfig(model_type="blenderbot-small").decoder_norms_tokens
    # A Marian checkpoint's old copies of the sinusoidal tables are dropped on load.
    assert any("embed_positions" in p for p in marian.FAMILY.hf.ignored)
    assert not any("embed_positions" in p for p in pegasus.FAMILY.hf.ignored)
