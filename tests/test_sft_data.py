"""flaxtrain.sft_data: formats, loss masks that train what TRL's SFTTrainer trains, lengths, prompts and stop tokens.

The tokenizers are tiny byte-level BPEs trained here, with the special tokens of Llama 3's and Qwen's chat templates;
the templates are the ones the models ship (tests/fixtures/chat_templates)."""

import os
import re

import numpy as np
import pytest

from flaxtrain import sft_data
from tests import tiny

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "chat_templates")
# Llama 3's pre-tokenization (Qwen2's differs only in splitting numbers digit by digit): a header's "\n\n" is one
# piece whether text follows it or not, as in the real tokenizers.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
SPECIAL = ["<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
CONVERSATION = [{"role": "system", "content": "You are a gardener."},
                {"role": "user", "content": "amber basil cedar?"},
                {"role": "assistant", "content": "dune ember fern."},
                {"role": "user", "content": "grove heath?"},
                {"role": "assistant", "content": "iris juniper kelp larch."}]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def backend():
    """The tokenizers.Tokenizer every test wraps, as JSON (each wrapper gets its own copy)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(tiny.WORDS, 8)) + rng.choice([".", "?"]) for _ in range(300)]
    corpus += ["system user assistant You are a helpful assistant gardener."] * 5
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, min_frequency=2, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return bpe.to_str()


def tokenizer_of(backend, template=None, eos="<|endoftext|>", bos=None):
    """A transformers tokenizer over `backend` with `template` (a file of TEMPLATES, or Jinja text); `bos` is also
    put before every text tokenized outside a chat template, as Llama 3's tokenizer does."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer.from_str(backend)
    if bos:
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, bpe.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, bos_token=bos or eos)
    if template:
        sft_data.set_chat_template(tokenizer, os.path.join(TEMPLATES, template) if template.endswith(".jinja")
                                   else template)
    return tokenizer


def llama3(backend):
    return tokenizer_of(backend, "llama3.jinja", eos="<|end_of_text|>", bos="<|begin_of_text|>")


def trained_runs(ids, mask):
    """The ids of each maximal run of trained tokens."""
    runs, run = [], []
    for token, trained in zip(ids, mask):
        if trained:
            run.append(token)
        elif run:
            runs, run = [*runs, run], []
    return runs + ([run] if run else [])


def assert_trains(tokenizer, ids, mask, texts):
    """TRL's rule written out: the trained tokens are exactly `texts` (each assistant turn's content and end of
    turn), one run each, as ids and as decoded strings."""
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    runs = trained_runs(ids, mask)
    assert runs == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert [tokenizer.decode(r) for r in runs] == texts


def without_markers(template):
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


# --- formats


@pytest.mark.parametrize("columns, expected", [(["text"], "text"), (["prompt", "completion"], "prompt_completion"),
                                               (["messages"], "conversational"), (["id", "messages"], "conversational"),
                                               (["prompt", "completion", "messages", "text"], "prompt_completion"),
                                               (["messages", "text"], "conversational")])
def test_detect_format(columns, expected):
    assert sft_data.detect_format(columns) == expected


def test_detect_format_reads_string_columns_as_text_like_the_script_did():
    import datasets

    features = datasets.Features({"id": datasets.Value("int64"), "content": datasets.Value("string")})
    assert sft_data.detect_format(features) == "text"
    with pytest.raises(ValueError, match=r"columns \(id\) fit no format.*--dataset_format"):
        sft_data.detect_format(datasets.Features({"id": datasets.Value("int64")}))


def test_detect_format_names_the_columns_and_the_flag():
    with pytest.raises(ValueError, match=r"columns \(question, answer\) fit no format.*--dataset_format") as e:
        sft_data.detect_format(["question", "answer"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="columns \\(prompt\\) fit no format"):
        sft_data.detect_format(["prompt"])


def test_detect_format_override():
    assert sft_data.detect_format(["prompt", "completion", "text"], override="text") == "text"
    assert sft_data.detect_format(["messages", "prompt", "completion"], "conversational") == "conversational"
    with pytest.raises(ValueError, match="--dataset_format=chat: use one of text, prompt_completion, conversational"):
        sft_data.detect_format(["messages"], "chat")
    with pytest.raises(ValueError, match="--dataset_format=prompt_completion needs the column.s. completion; "
                                         "the data has prompt, text"):
        sft_data.detect_format(["prompt", "text"], "prompt_completion")


# --- chat templates


def test_read_chat_template(tmp_path):
    literal = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert sft_data.read_chat_template(literal) == literal
    path = tmp_path / "t.jinja"
    path.write_text(literal + "\n")
    assert sft_data.read_chat_template(str(path)) == literal + "\n"
    with pytest.raises(ValueError, match="--chat_template=nope.jinja: no such file"):
        sft_data.read_chat_template("nope.jinja")


def test_llama3_trains_the_assistant_contents_and_eot(backend):
    tokenizer = llama3(backend)
    assert not sft_data.has_generation_markers(tokenizer.chat_template)
    ids, mask = sft_data.encode_conversation(tokenizer, CONVERSATION)
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")  # the template's BOS, only once
    assert ids.count(ids[0]) == 1
    assert_trains(tokenizer, ids, mask, [a + "<|eot_id|>" for a in ANSWERS])
    header = tokenizer("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)["input_ids"]
    starts = [i for i in range(len(ids)) if ids[i:i + len(header)] == header]
    assert len(starts) == 2 and not any(any(mask[s:s + len(header)]) for s in starts)


@pytest.mark.parametrize("template", ["qwen2_5.jinja", "chatml_generation.jinja"])
def test_chatml_trains_the_assistant_contents_and_im_end(backend, template):
    """Qwen2.5's template as shipped (no markers: found prefix by prefix) and ChatML with {% generation %} markers
    train each answer, <|im_end|> and the newline after it, never the header <|im_start|>assistant\\n."""
    tokenizer = tokenizer_of(backend, template)
    ids, mask = sft_data.encode_conversation(tokenizer, CONVERSATION)
    assert_trains(tokenizer, ids, mask, [a + "<|im_end|>\n" for a in ANSWERS])
    assert tokenizer.decode(ids).count("<|im_start|>assistant\n") == 2


def test_generation_markers_and_prefixes_give_the_same_mask(backend):
    marked = tokenizer_of(backend, "chatml_generation.jinja")
    assert sft_data.has_generation_markers(marked.chat_template)
    unmarked = tokenizer_of(backend, without_markers(marked.chat_template))
    shipped = tokenizer_of(backend, "qwen2_5.jinja")
    conversations = [CONVERSATION, CONVERSATION[1:], CONVERSATION[:3], CONVERSATION[:4]]
    for messages in conversations:
        expected = sft_data.encode_conversation(marked, messages)
        assert sft_data.encode_conversation(unmarked, messages) == expected
        assert sft_data.encode_conversation(shipped, messages) == expected
    # without a system message Qwen's default one is trained on neither path
    ids, mask = sft_data.encode_conversation(shipped, CONVERSATION[1:])
    assert "You are Qwen" in shipped.decode(ids)
    assert_trains(shipped, ids, mask, [a + "<|im_end|>\n" for a in ANSWERS])


def test_assistant_only_loss_off_trains_everything(backend):
    for tokenizer in (llama3(backend), tokenizer_of(backend, "chatml_generation.jinja")):
        ids, mask = sft_data.encode_conversation(tokenizer, CONVERSATION, assistant_only_loss=False)
        assert len(ids) > 30 and mask == [1] * len(ids)


CHATML_BODY = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MARKED_BODY = CHATML_BODY.replace("{{ m.content }}<|im_end|>\n", "{% if m.role == 'assistant' %}{% generation %}"
                                  "{{ m.content }}<|im_end|>\n{% endgeneration %}{% else %}{{ m.content }}<|im_end|>\n"
                                  "{% endif %}")
SPACED = ("{% for m in messages %}{% if m.role == 'assistant' %}Assistant: {{ m.content }}<|im_end|>{% else %}"
          "{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")
# name: (the template, the same with {% generation %} markers around the answers)
NOT_PREFIX_TEMPLATES = {
    "counts the messages": ("{{ messages | length }} messages\n" + CHATML_BODY,
                            "{{ messages | length }} messages\n" + MARKED_BODY),
    "dates the last user message": tuple("{% if messages[-1].role == 'user' %}<|im_start|>system\nToday is Monday"
                                         "<|im_end|>\n{% endif %}" + body for body in (CHATML_BODY, MARKED_BODY)),
    # a prefix as a string, not as tokens: the header "Assistant: " ends in a space token, and " dune" is one token
    "ends its header with a space": (SPACED, SPACED.replace("{{ m.content }}<|im_end|>", "{% generation %}"
                                                            "{{ m.content }}<|im_end|>{% endgeneration %}")),
}


@pytest.mark.parametrize("name", list(NOT_PREFIX_TEMPLATES))
def test_a_template_that_does_not_render_prefixes_is_refused(backend, name):
    template, marked = NOT_PREFIX_TEMPLATES[name]
    tokenizer = tokenizer_of(backend, template)
    if template == SPACED:
        start = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
        assert tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False).startswith(start)
    with pytest.raises(ValueError, match="start of a conversation.*--chat_template.*generation") as e:
        sft_data.encode_conversation(tokenizer, CONVERSATION)
    assert "\n" not in str(e.value)
    # with markers, the answers are found
    ids, mask = sft_data.encode_conversation(tokenizer_of(backend, marked), CONVERSATION)
    assert [tokenizer.decode(r).strip() for r in trained_runs(ids, mask)] == [a + "<|im_end|>" for a in ANSWERS]


def test_conversational_data_needs_a_chat_template(backend):
    tokenizer = tokenizer_of(backend)
    for call in (lambda: sft_data.encode_conversation(tokenizer, CONVERSATION),
                 lambda: sft_data.generation_prompt_ids(tokenizer, CONVERSATION[:2]),
                 lambda: sft_data.encode_prompt_completion(tokenizer, CONVERSATION[:2], CONVERSATION[2:3])):
        with pytest.raises(ValueError, match="no chat template.*--chat_template"):
            call()


def test_a_conversation_that_starts_with_the_assistant_is_refused_without_markers(backend):
    with pytest.raises(ValueError, match="starts with an assistant message"):
        sft_data.encode_conversation(llama3(backend), CONVERSATION[2:])


def test_markers_around_nothing_are_refused(backend):
    template = CHATML_BODY.replace("<|im_end|>\n{% endfor %}", "<|im_end|>\n{% generation %}{% endgeneration %}"
                                                               "{% endfor %}")
    with pytest.raises(ValueError, match="markers enclose no token"):
        sft_data.encode_conversation(tokenizer_of(backend, template), CONVERSATION)


# --- prompt/completion


def test_prompt_completion_trains_the_completion_and_eos(backend):
    tokenizer = tokenizer_of(backend)
    eos = tokenizer.eos_token_id
    prompt, completion = "amber basil cedar?", " dune ember."
    ids, mask = sft_data.encode_prompt_completion(tokenizer, prompt, completion)
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert ids == prompt_ids + completion_ids + [eos]
    assert mask == [0] * len(prompt_ids) + [1] * (len(completion_ids) + 1)
    assert tokenizer.decode(trained_runs(ids, mask)[0]) == completion + "<|endoftext|>"
    assert sft_data.encode_prompt_completion(tokenizer, prompt, completion, completion_only_loss=False) == (
        ids, [1] * len(ids))
    assert sft_data.encode_prompt_completion(tokenizer, prompt, completion + "<|endoftext|>") == (ids, mask)


def test_prompt_completion_keeps_the_tokenizers_bos_on_the_prompt_only(backend):
    tokenizer = tokenizer_of(backend, eos="<|end_of_text|>", bos="<|begin_of_text|>")
    ids, mask = sft_data.encode_prompt_completion(tokenizer, "amber?", " basil.")
    bos = tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained_runs(ids, mask)[0]) == " basil.<|end_of_text|>"


def test_conversational_prompt_completion(backend):
    tokenizer = llama3(backend)
    prompt, completion = CONVERSATION[:4], CONVERSATION[4:]  # the prompt holds an earlier answer
    ids, mask = sft_data.encode_prompt_completion(tokenizer, prompt, completion)
    assert ids == sft_data.encode_conversation(tokenizer, CONVERSATION)[0]
    assert_trains(tokenizer, ids, mask, [ANSWERS[1] + "<|eot_id|>"])
    _, everything = sft_data.encode_prompt_completion(tokenizer, prompt, completion, completion_only_loss=False)
    assert_trains(tokenizer, ids, everything, [a + "<|eot_id|>" for a in ANSWERS])
    _, all_ones = sft_data.encode_prompt_completion(tokenizer, prompt, completion, completion_only_loss=False,
                                                    assistant_only_loss=False)
    assert all_ones == [1] * len(ids)
    with pytest.raises(ValueError, match="both be strings or both be lists"):
        sft_data.encode_prompt_completion(tokenizer, "amber?", completion)


# --- lengths and batches


def test_truncated_and_dropped_examples_are_counted(backend):
    tokenizer = tokenizer_of(backend)
    prompts = ["amber?", "basil cedar dune ember fern grove heath?", "iris?", "juniper kelp?"]
    completions = [" olive.", " pine.", " quartz reed sage thyme umber vale willow.", " yarrow."]
    batch = {"prompt": prompts, "completion": completions, "id": [0, 1, 2, 3]}
    lengths = [len(sft_data.encode_prompt_completion(tokenizer, p, c)[0]) for p, c in zip(prompts, completions)]
    max_length = 6  # examples 1 and 2 are longer, 1 already in its prompt; 3 is as long
    assert [n - max_length for n in lengths] == [-1, 5, 5, 0] and len(tokenizer(prompts[1])["input_ids"]) > 6

    truncated = sft_data.sft_encoder(tokenizer, "prompt_completion", max_length)(batch)
    assert truncated["num_tokens"] == lengths
    for row, n in enumerate(lengths):
        ids, mask = sft_data.encode_prompt_completion(tokenizer, prompts[row], completions[row])
        assert truncated["input_ids"][row] == ids[:max_length] and truncated["loss_mask"][row] == mask[:max_length]
        assert truncated["num_trained"][row] == sum(mask[:max_length])
    assert sft_data.length_counts(truncated, max_length) == {"examples": 4, "long": 2, "kept": 3}

    dropped = sft_data.sft_encoder(tokenizer, "prompt_completion", max_length, drop_long=True)(batch)
    assert [len(ids) for ids in dropped["input_ids"]] == [n if n <= max_length else 0 for n in lengths]
    assert sft_data.length_counts(dropped, max_length) == {"examples": 4, "long": 2, "kept": 2}


def test_the_encoder_maps_a_dataset_in_batches(backend):
    import datasets

    tokenizer = tokenizer_of(backend, "qwen2_5.jinja")
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}, {"messages": CONVERSATION[:2]}]
    raw = datasets.Dataset.from_list(rows)
    assert sft_data.detect_format(raw.features) == "conversational"
    encoded = raw.map(sft_data.sft_encoder(tokenizer, "conversational", 1000), batched=True, batch_size=2,
                      remove_columns=raw.column_names)
    for row, example in zip(encoded, rows):
        assert (row["input_ids"], row["loss_mask"]) == sft_data.encode_conversation(tokenizer, example["messages"])
    assert sft_data.length_counts(encoded, 1000) == {"examples": 3, "long": 0, "kept": 2}  # the last has no answer
    assert len(encoded.filter(lambda n: n > 0, input_columns="num_trained")) == 2


# --- generation


def test_generation_prompt_ids(backend):
    tokenizer = llama3(backend)
    ids = sft_data.generation_prompt_ids(tokenizer, CONVERSATION[:2])
    assert tokenizer.decode(ids) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a "
                                     "gardener.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\namber basil "
                                     "cedar?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    full, _ = sft_data.encode_conversation(tokenizer, CONVERSATION[:3])
    assert full[:len(ids)] == ids


def test_stop_token_ids(backend):
    def ids(tokenizer, *tokens):
        return tokenizer.convert_tokens_to_ids(list(tokens))

    base_llama = llama3(backend)
    assert sft_data.stop_token_ids(base_llama) == ids(base_llama, "<|end_of_text|>", "<|eot_id|>")
    instruct_llama = tokenizer_of(backend, "llama3.jinja", eos="<|eot_id|>", bos="<|begin_of_text|>")
    assert sft_data.stop_token_ids(instruct_llama) == ids(instruct_llama, "<|eot_id|>")
    for template in ("qwen2_5.jinja", "chatml_generation.jinja"):
        qwen = tokenizer_of(backend, template)
        assert sft_data.stop_token_ids(qwen) == ids(qwen, "<|endoftext|>", "<|im_end|>")
    # a template that ends the turn with EOS itself, one that ends it with text, and none
    for template in ("{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}{% endfor %}",
                     "{% for m in messages %}{{ m.role }}: {{ m.content }}\n### End\n{% endfor %}", None):
        tokenizer = tokenizer_of(backend, template)
        assert sft_data.stop_token_ids(tokenizer) == ids(tokenizer, "<|endoftext|>")
