"""ELECTRA encoder with masked-LM (the generator) and sequence-classification heads, as Flax linen modules.

ELECTRA's body is BERT's (the modules of `flaxtrain.models.bert`, under `electra` instead of `bert`) with one
difference: its embeddings have their own width, embedding_size, and when that differs from hidden_size a Linear
`electra.embeddings_project` maps them up to it. Its classifier is RoBERTa's head on the first token with gelu for
tanh. Pretraining checkpoints are the discriminator (`ElectraForPreTraining`, head `discriminator_predictions`) and
the generator (`ElectraForMaskedLM`, heads `generator_predictions` and `generator_lm_head`); a classifier drops both.
The generator is a masked LM of its own: hidden [D] -> dense [E] -> gelu -> LayerNorm -> the word embeddings [V, E]
transposed, plus a bias.

Shapes: B batch, T length, D hidden_size, E embedding_size, V vocab_size, K masked positions.
"""

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from flaxtrain.models import bert
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.layers import TiedDecoder, dense, layer_norm
from flaxtrain.models.partitioning import EMBED


@dataclasses.dataclass(frozen=True)
class ElectraConfig(bert.BertConfig):
    """A Hugging Face ELECTRA `config.json`'s fields: BERT's plus embedding_size (defaults: ELECTRA-small)."""

    embedding_size: int = 128
    hidden_size: int = 256
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    model_type: str = "electra"

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("electra",)


class ElectraForSequenceClassification(nn.Module):
    """ELECTRA with `classifier.{dense,out_proj}` on the first token: dropout, dense, gelu, dropout, out_proj."""

    config: ElectraConfig
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "ElectraForSequenceClassification"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """[B, T] int inputs (attention_mask 1 = token, 0 = pad) -> logits [B, num_labels] float32."""
        cfg = self.config
        body = bert.BertModel(cfg, self.dtype, self.gradient_checkpointing, embedding_size=cfg.embedding_size,
                              name="electra")
        hidden, _ = body(input_ids, attention_mask, token_type_ids, deterministic)
        # transformers' ElectraClassificationHead uses gelu where BERT/RoBERTa use tanh, whatever hidden_act says.
        head = bert.RobertaClassificationHead(cfg, self.dtype, activation=bert.ACT_FNS["gelu"], name="classifier")
        return head(hidden, deterministic).astype(jnp.float32)


class ElectraGeneratorPredictions(nn.Module):
    """The generator's transform: dense [D, E], gelu (exact, whatever hidden_act says), LayerNorm over E."""

    config: ElectraConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """[B, T, D] -> [B, T, E]."""
        cfg = self.config
        x = dense(cfg.initializer_range, self.dtype, cfg.embedding_size, "dense", (EMBED, None))(x)
        x = bert.ACT_FNS["gelu"](x)
        return layer_norm(cfg.layer_norm_eps, self.dtype, "LayerNorm")(x)


class ElectraForMaskedLM(nn.Module):
    """The ELECTRA generator: `generator_predictions` and `generator_lm_head` (weights tied to the word embeddings,
    only its bias saved)."""

    config: ElectraConfig
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "ElectraForMaskedLM"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True, positions=None):
        """[B, T] int inputs -> logits [B, T, V] float32, or [B, K, V] at `positions` [B, K] (as
        bert.BertForMaskedLM). Dropout needs the "dropout" rng when not deterministic."""
        cfg = self.config
        body = bert.BertModel(cfg, self.dtype, self.gradient_checkpointing, embedding_size=cfg.embedding_size,
                              name="electra")
        hidden, _ = body(input_ids, attention_mask, token_type_ids, deterministic)
        x = ElectraGeneratorPredictions(cfg, self.dtype, name="generator_predictions")(
            bert.at_positions(hidden, positions))
        return TiedDecoder(name="generator_lm_head")(x, body.word_embedding_matrix())


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). The body is BERT's, so
# are its init, its position limit and its scanned layers.
FAMILY = Family(
    model_types=ElectraConfig.MODEL_TYPES, config=ElectraConfig,
    heads={"MaskedLM": ElectraForMaskedLM, "SequenceClassification": ElectraForSequenceClassification},
    init_params=bert.FAMILY.init_params, max_positions=bert.FAMILY.max_positions,
    hf=HfRules(
        scanned=bert.FAMILY.hf.scanned,
        tied={"generator_lm_head.weight": "electra.embeddings.word_embeddings.weight"},
        base_prefix={"electra": "electra"},
        pretraining_heads=(r"^discriminator_predictions\.", r"^generator_predictions\.", r"^generator_lm_head\."),
        classifier_head=(r"^classifier\.",),
    ),
)
