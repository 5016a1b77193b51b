"""The data side of supervised fine-tuning (SFT): which format a dataset is in, and each example as token ids with a
loss mask (1 on the tokens that are trained), the way TRL's SFTTrainer prepares them.

Formats, told by the column names as TRL tells them:
  "prompt_completion"  `prompt` and `completion`: strings (the loss on the completion and the end-of-sequence token
                       after it), or lists of messages (TRL's conversational prompt/completion: the prompt rendered
                       with the chat template's generation prompt, the loss on what the completion adds to it);
  "conversational"     `messages`: [{"role", "content"}, ...] rendered with the tokenizer's chat template, the loss on
  "text"               plain language modelling, which run_clm_flax.py reads its own way (documents joined into blocks).
  "text"               plain language modelling: every token.

Assistant turns are found (a) from the template's {% generation %} ... {% endgeneration %} markers when it has them
(transformers marks the tokens between them), else (b) by rendering the conversation prefix by prefix: the tokens
that rendering messages[:i+1] adds to rendering messages[:i] with the generation prompt are assistant turn i's. The
generation prompt (e.g. "<|im_start|>assistant\\n") is what the model is given at inference, so it is not trained;
the end-of-turn token after the content (<|im_end|>, <|eot_id|>) is, or the model never learns to stop. (b) needs a
template that renders the start of a conversation as the start of the whole, token for token; one that does not
(it prints the number of messages, or today's date only under the last user message, or drops earlier reasoning)
is refused, not guessed.

Unlike TRL: a template without markers is not swapped for a "training" copy of a known one (the prefixes find the
same tokens for any template that passes), and a string prompt and completion are tokenized apart, not as one text.
"""

import logging
import re
from collections.abc import Mapping, Sequence

import jinja2

from flaxtrain import storage

logger = logging.getLogger(__name__)

FORMATS = ("text", "prompt_completion", "conversational")
NEEDED_COLUMNS = {"prompt_completion": ("prompt", "completion"), "conversational": ("messages",)}
GENERATION_MARKER = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")
QUIET = {"verbose": False}  # no "longer than the model's maximum" warning: lengths are handled here
NOT_PREFIX = ("The chat template does not render the start of a conversation as the start of the whole (e.g. it "
              "prints something that depends on later messages), so its assistant turns cannot be found: give a "
              "--chat_template that marks the assistant messages with {% generation %} ... {% endgeneration %}.")
STOP_PROBE = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal, say."}]


def detect_format(columns, override: str | None = None) -> str:
    """One of FORMATS from a dataset's columns: a list of names, or its `features` (then any string column makes it
    "text", as data.text_column picks it). `override`: --dataset_format, checked against the columns."""
    data_format = _format_of(columns, override)
    messages = columns.get("messages") if isinstance(columns, Mapping) else None
    if data_format == "conversational" and getattr(messages, "dtype", None) in ("string", "large_string"):
        raise ValueError("The column 'messages' holds text (as a CSV file has it), not a list of {role, content} per "
                         "row: give the conversations as JSON Lines or parquet, or --dataset_format=text.")
    return data_format


def _format_of(columns, override: str | None) -> str:
    names = list(columns)
    if override:
        if override not in FORMATS:
            raise ValueError(f"--dataset_format={override}: use one of {', '.join(FORMATS)}.")
        missing = [c for c in NEEDED_COLUMNS.get(override, ()) if c not in names]
        if missing:
            raise ValueError(f"--dataset_format={override} needs the column(s) {', '.join(missing)}; the data has "
                             f"{', '.join(names)}.")
        return override
    if "prompt" in names and "completion" in names:  # before `messages`, as TRL looks
        return "prompt_completion"
    if "messages" in names:
        return "conversational"
    strings = isinstance(columns, Mapping) and any(
        getattr(f, "dtype", None) in ("string", "large_string") for f in columns.values())
    if "text" in names or strings:
        return "text"
    raise ValueError(f"The data's columns ({', '.join(names)}) fit no format: expected 'text', 'prompt' and "
                     f"'completion', or 'messages'. Rename them, or set --dataset_format.")


def read_chat_template(value: str) -> str:
    """--chat_template: the template's Jinja text itself, or a file (e.g. template.jinja, local or in a bucket)."""
    if "{{" in value or "{%" in value:  # no file name has these
        return value
    if not storage.isfile(value):
        raise ValueError(f"--chat_template={value}: no such file, and not a Jinja template either.")
    return storage.read_text(value)


def set_chat_template(tokenizer, value: str):
    """Replaces the tokenizer's chat template with --chat_template's, so that a saved tokenizer carries it too."""
    tokenizer.chat_template = read_chat_template(value)


def has_generation_markers(template: str) -> bool:
    return GENERATION_MARKER.search(template) is not None


def _chat_template(tokenizer) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat template, which conversational data needs: give one with "
                         "--chat_template (a .jinja file or the template's text).")
    return tokenizer.get_chat_template()


def _render(tokenizer, messages, **options):
    """apply_chat_template's tokens ({"input_ids", ...}; the template writes its own special tokens, such as BOS)."""
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                             tokenizer_kwargs=QUIET, **options)
    except jinja2.TemplateError as e:
        raise ValueError(f"The chat template cannot render a conversation: {e}") from e


def _starts_with(ids, prefix) -> bool:
    return len(prefix) <= len(ids) and list(ids[:len(prefix)]) == list(prefix)


def _assistant_mask_by_prefixes(tokenizer, messages, ids) -> list[int]:
    """1 on the tokens that each assistant message's rendering adds to the rendering of the messages before it with
    the generation prompt; every such rendering must be a token prefix of the next and of the whole (`ids`)."""
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("A conversation starts with an assistant message, whose header cannot then be told from "
                             "its content: start it with a system or user message, or give a --chat_template that "
                             "marks the assistant messages with {% generation %} ... {% endgeneration %}.")
        start = _render(tokenizer, messages[:i], add_generation_prompt=True)["input_ids"]
        end = ids if i == len(messages) - 1 else _render(tokenizer, messages[:i + 1])["input_ids"]
        if not (_starts_with(end, start) and _starts_with(ids, end)):
            raise ValueError(NOT_PREFIX)
        mask[len(start):len(end)] = [1] * (len(end) - len(start))
    return mask


def encode_conversation(tokenizer, messages, assistant_only_loss: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids [T], loss_mask [T]) of a conversation rendered with the tokenizer's chat template; the mask is 1 on
    the assistant turns (their content and end of turn, not their header), or everywhere without
    `assistant_only_loss`."""
    template = _chat_template(tokenizer)
    if not assistant_only_loss:
        ids = _render(tokenizer, messages)["input_ids"]
        return ids, [1] * len(ids)
    if has_generation_markers(template):
        encoded = _render(tokenizer, messages, return_assistant_tokens_mask=True)
        mask = list(encoded["assistant_masks"])
        if not any(mask) and any(m["role"] == "assistant" for m in messages):
            raise ValueError("The chat template's {% generation %} markers enclose no token of the assistant "
                             "messages: put them around what an assistant message adds after its header.")
        return encoded["input_ids"], mask
    ids = _render(tokenizer, messages)["input_ids"]
    return ids, _assistant_mask_by_prefixes(tokenizer, messages, ids)


def encode_prompt_completion(tokenizer, prompt, completion, completion_only_loss: bool = True,
                             assistant_only_loss: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids [T], loss_mask [T]) of a prompt and its completion; the mask is 1 on the completion only, or
    everywhere without `completion_only_loss`.

    Strings: the prompt's tokens (with the tokenizer's own special tokens, e.g. a BOS, as a prompt is tokenized for
    generation), then the completion's, then EOS unless the completion ends with it. Each is tokenized alone, since
    at inference the prompt is, and the model must learn the tokens that it then continues with. Lists of messages:
    the prompt rendered with the generation prompt, then what the completion's messages add to it (within which
    `assistant_only_loss` keeps the assistant turns only)."""
    if isinstance(prompt, str) != isinstance(completion, str):
        raise ValueError("A prompt and its completion must both be strings or both be lists of messages.")
    if isinstance(prompt, str):
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has no end-of-sequence token, which ends every completion.")
        prompt_ids = tokenizer(prompt, **QUIET)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False, **QUIET)["input_ids"]
        if completion_ids[-1:] != [tokenizer.eos_token_id]:
            completion_ids.append(tokenizer.eos_token_id)
        trained = [0] * len(prompt_ids) if completion_only_loss else [1] * len(prompt_ids)
        return prompt_ids + completion_ids, trained + [1] * len(completion_ids)
    _chat_template(tokenizer)
    prompt_ids = _render(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
    ids, mask = encode_conversation(tokenizer, [*prompt, *completion], assistant_only_loss)
    if not _starts_with(ids, prompt_ids):
        raise ValueError(NOT_PREFIX)
    if completion_only_loss:
        mask[:len(prompt_ids)] = [0] * len(prompt_ids)
    return ids, mask


def encode_example(tokenizer, example: Mapping, data_format: str, completion_only_loss: bool = True,
                   assistant_only_loss: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids [T], loss_mask [T]) of one example (a row: column -> value) of `data_format`, an SFT format
    (text is run_clm_flax's own path: documents joined and cut into blocks)."""
    if data_format == "prompt_completion":
        return encode_prompt_completion(tokenizer, example["prompt"], example["completion"], completion_only_loss,
                                        assistant_only_loss)
    if data_format == "conversational":
        return encode_conversation(tokenizer, example["messages"], assistant_only_loss)
    raise ValueError(f"Unknown data format {data_format!r}: use one of {', '.join(FORMATS)}.")


def sft_encoder(tokenizer, data_format: str, max_length: int, drop_long: bool = False,
                completion_only_loss: bool = True, assistant_only_loss: bool = True):
    """A batched map function (datasets' `.map(batched=True)`): a dict of columns in, one row out per row in:
      input_ids [T] and loss_mask [T], T <= max_length;
      num_tokens: the example's length before truncation (> max_length: it was truncated, or dropped);
      num_trained: how many of its tokens the mask keeps.
    An example longer than `max_length` is cut to its first max_length tokens, or with `drop_long` emptied (no
    tokens, num_trained 0). Rows stay one to one with the input (cache-safe and with num_proc, where a count kept in
    a closure would not be), so the caller counts with `length_counts`, then keeps the rows with num_trained > 0:
    `.filter(lambda n: n > 0, input_columns="num_trained")` (TRL too drops examples with nothing to train)."""
    def encode(examples):
        out = {"input_ids": [], "loss_mask": [], "num_tokens": [], "num_trained": []}
        names = list(examples)
        for values in zip(*examples.values()):
            ids, mask = encode_example(tokenizer, dict(zip(names, values)), data_format, completion_only_loss,
                                       assistant_only_loss)
            out["num_tokens"].append(len(ids))
            if len(ids) > max_length:
                ids, mask = ([], []) if drop_long else (ids[:max_length], mask[:max_length])
            out["input_ids"].append(ids)
            out["loss_mask"].append(mask)
            out["num_trained"].append(sum(mask))
        return out

    return encode


def length_counts(encoded, max_length: int) -> dict:
    """From sft_encoder's columns (a Dataset or a dict of lists): {"examples": all rows, "long": rows longer than
    max_length (truncated or dropped), "kept": rows with a token to train}. The script's log line, e.g.
    "{long} of {examples} examples were longer than --block_size={max_length}: truncated"."""
    num_tokens, num_trained = list(encoded["num_tokens"]), list(encoded["num_trained"])
    return {"examples": len(num_tokens), "long": sum(n > max_length for n in num_tokens),
            "kept": sum(n > 0 for n in num_trained)}


def generation_prompt_ids(tokenizer, messages: Sequence[Mapping]) -> list[int]:
    """The token ids that prompt a chat model to answer `messages`: the chat template with its generation prompt."""
    _chat_template(tokenizer)
    return _render(tokenizer, messages, add_generation_prompt=True)["input_ids"]


def stop_token_ids(tokenizer) -> list[int]:
    """The ids a chat model ends its turn with, for the generation config: EOS, plus the token the chat template
    writes right after an assistant message's content (whitespace skipped) when that is a special or added token,
    not text: <|im_end|> (ChatML, Qwen), <|eot_id|> (Llama 3), <end_of_turn> (Gemma); nothing more for a template
    that ends the turn with EOS itself, or for a tokenizer without a template."""
    stops = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if not getattr(tokenizer, "chat_template", None):
        return stops
    try:
        rendered = tokenizer.apply_chat_template(STOP_PROBE, tokenize=False)
    except jinja2.TemplateError as e:
        logger.warning("The chat template cannot render a one-turn conversation (%s): generation stops at EOS only.",
                       e)
        return stops
    content = STOP_PROBE[-1]["content"]
    if content not in rendered:
        logger.warning("The chat template changes an assistant message's content: generation stops at EOS only.")
        return stops
    content_end = rendered.rfind(content) + len(content)
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True, **QUIET)
    marks = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        if start < content_end or not tokenizer.decode([token]).strip():
            continue
        if token in marks and token not in stops:
            stops.append(token)
        break
    return stops
