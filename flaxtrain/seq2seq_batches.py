"""How a summarization split's examples become padded batches: documents padded to a few widths fitted to the
split's lengths (packing.fitted_widths), summaries to the split's longest, the teacher-forcing inputs made from the
summaries. run_summarization_flax.py takes its batches from here; the original padded everything to the maximum
lengths (--pad_to_max_length still does).
"""

import dataclasses
from typing import Optional

import numpy as np

from flaxtrain import packing


def batch(examples, widths: tuple[int, int], pad_id: int, shift_right) -> dict[str, np.ndarray]:
    """Tokenized rows -> a teacher-forcing batch, documents padded to widths[0] and summaries (if any) to widths[1];
    weights [b, T] mark real summary tokens (EOS too)."""
    input_ids, attention_mask = packing.padded(examples["input_ids"], widths[0], pad_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask.astype(np.int32)}
    if "labels" in examples:
        labels, weights = packing.padded(examples["labels"], widths[1], pad_id)
        batch.update(labels=labels, decoder_input_ids=np.asarray(shift_right(labels), np.int32),
                     weights=weights.astype(np.float32))
    return batch


@dataclasses.dataclass(frozen=True)
class Lengths:
    """A tokenized split's document and summary lengths [N] (target None: a test set without summaries)."""
    source: np.ndarray
    target: Optional[np.ndarray]

    @classmethod
    def of(cls, dataset) -> "Lengths":
        return cls(np.asarray(dataset["source_length"]),
                   np.asarray(dataset["target_length"]) if "target_length" in dataset.column_names else None)


# How many document widths a split's batches may have (packing.fitted_widths): each is one more compiled step (the
# generation loop's too, in evaluation); summaries have one, their longest's.
TRAIN_WIDTHS, EVAL_WIDTHS = 4, 2


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The widths a batch's documents and summaries may be padded to: a global batch takes the smallest that fits
    its longest of each, the same on every host."""
    source: list[int]
    target: list[int]

    @classmethod
    def of(cls, lengths: Lengths, source_length: int, target_length: int, count: int,
           pad_to_max_length: bool) -> "Buckets":
        """Fitted to the split's `lengths` (at most `count` document widths); or the maximum lengths alone."""
        if pad_to_max_length:
            return cls([source_length], [target_length])
        return cls(packing.fitted_widths(lengths.source, count, source_length),
                   [target_length] if lengths.target is None else
                   packing.fitted_widths(lengths.target, 1, target_length))

    def widths(self, lengths: Lengths, indices: np.ndarray) -> tuple[int, int]:
        """(document width, summary width) of the global batch of examples `indices`."""
        target = (self.target[0] if lengths.target is None
                  else packing.bucket_width(self.target, lengths.target[indices]))
        return packing.bucket_width(self.source, lengths.source[indices]), target
