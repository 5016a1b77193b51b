"""README's models table is the registry: every model type with the scripts whose head it has, and nothing else;
models.create's refusal lists the same types."""

import pathlib
import re

import pytest
import transformers

import run_t5_mlm_flax

from flaxtrain.models import FAMILIES, create

# The table's short script names -> the head each script creates.
SCRIPT_HEADS = {"mlm": "MaskedLM", "clm": "CausalLM", "t5_mlm": "Seq2SeqLM", "summarization": "Seq2SeqLM",
                "glue": "SequenceClassification"}


def readme_table() -> dict[str, set[str]]:
    """{model type: its scripts' short names} from README.md's "## Models" table."""
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("\n## Models\n", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not line.startswith("| `"):
            continue
        scripts = {s.strip() for s in cells[1].split(",")}
        for model_type in re.findall(r"`([^`]+)`", cells[0]):
            assert model_type not in table, f"{model_type} is listed twice"
            table[model_type] = scripts
    return table


def test_readme_lists_every_model_type_with_its_scripts():
    table = readme_table()
    assert {t: {SCRIPT_HEADS[s] for s in scripts} for t, scripts in table.items()} == {
        t: set(f.heads) for t, f in FAMILIES.items()}
    # Of the Seq2SeqLM types, the T5 script takes the T5-like ones (span corruption), summarization all.
    assert {t for t, scripts in table.items() if "t5_mlm" in scripts} == set(run_t5_mlm_flax.MODEL_TYPES)
    assert {t for t, scripts in table.items() if "summarization" in scripts} == {
        t for t, f in FAMILIES.items() if "Seq2SeqLM" in f.heads}


@pytest.mark.parametrize("head", sorted(set(SCRIPT_HEADS.values())))
def test_refusal_lists_the_types_that_have_the_head(head):
    expected = ", ".join(sorted(t for t, f in FAMILIES.items() if head in f.heads))
    with pytest.raises(ValueError, match=re.escape(f"supported model types: {expected}")):
        create(transformers.AutoConfig.for_model("xlnet"), head)
