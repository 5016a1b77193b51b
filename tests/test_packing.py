"""flaxtrain.packing: BFD packing keeps every example whole in one segment, fills rows, never trains across two
examples; padded batches group lengths into few widths."""

import itertools

import datasets
import numpy as np
import pytest

from flaxtrain import packing

PAD = -1  # a pad id no example uses, so that padding is visible in the rows


def examples_of(lengths, seed=0):
    """Example i's tokens are 1000 * i + 0, 1, 2...: each token names its example and place. Loss masks at random."""
    rng = np.random.default_rng(seed)
    input_ids = [list(range(1000 * i, 1000 * i + n)) for i, n in enumerate(lengths)]
    loss_mask = [rng.integers(0, 2, n).tolist() for n in lengths]
    return input_ids, loss_mask


def lognormal_lengths(n, block_size, seed=0):
    """Conversations: log-normal token counts, median 300, cut to the block."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(300), 0.9, n).astype(int), 1, block_size)


def segments(rows):
    """{example index: (its tokens, its weights, its positions)} read back from packed rows."""
    found = {}
    for r, s in zip(*np.nonzero(rows["positions"] == 0)):
        if rows["segment_ids"][r, s] == 0:
            continue
        end = s + np.count_nonzero(rows["segment_ids"][r] == rows["segment_ids"][r, s])
        tokens = rows["input_ids"][r, s:end]
        found[int(tokens[0]) // 1000] = (tokens, rows["weights"][r, s:end], rows["positions"][r, s:end])
    return found


def optimal_rows(lengths, block_size):
    """The fewest rows that hold `lengths`, by trying every assignment (a few items only)."""
    best = len(lengths)

    def place(i, loads):
        nonlocal best
        if len(loads) >= best:
            return
        if i == len(lengths):
            best = len(loads)
            return
        for r in range(len(loads)):
            if loads[r] + lengths[i] <= block_size:
                place(i + 1, loads[:r] + [loads[r] + lengths[i]] + loads[r + 1:])
        place(i + 1, loads + [lengths[i]])

    place(0, [])
    return best


def test_every_example_is_in_one_segment_whole_and_in_order():
    lengths = [5, 1, 16, 9, 3, 7, 7, 2, 12, 4, 8, 1, 6]
    input_ids, loss_mask = examples_of(lengths)
    rows, plan = packing.pack(input_ids, loss_mask, 16, PAD)
    assert rows["input_ids"].shape == (plan.num_rows, 16)
    assert sorted(plan.examples.tolist()) == list(range(len(lengths)))
    found = segments(rows)
    assert sorted(found) == list(range(len(lengths)))
    for i, (tokens, weights, positions) in found.items():
        assert tokens.tolist() == input_ids[i]
        assert positions.tolist() == list(range(lengths[i]))
        assert weights.tolist() == [0] + loss_mask[i][1:]  # the first token is no one's target
    assert rows["input_ids"].size - (rows["input_ids"] == PAD).sum() == sum(lengths) == plan.real_tokens
    assert plan.fill == sum(lengths) / (16 * plan.num_rows)


def test_rows_never_exceed_the_block_and_padding_is_inert():
    lengths = lognormal_lengths(3000, 2048)
    plan = packing.plan_packing(lengths, 2048)
    row_tokens = np.add.reduceat(lengths[plan.examples], plan.row_starts[:-1])
    assert row_tokens.max() <= 2048 and row_tokens.sum() == lengths.sum()
    input_ids, loss_mask = examples_of(lengths[:300])
    rows, _ = packing.pack(input_ids, loss_mask, 2048, PAD)
    pad = rows["segment_ids"] == 0
    assert (pad == (rows["input_ids"] == PAD)).all()
    assert (rows["weights"][pad] == 0).all() and (rows["positions"][pad] == 0).all()
    # Segments are numbered 1, 2, 3... in each row and padding comes only after the last one.
    for row in rows["segment_ids"]:
        used = row[row > 0]
        assert (np.diff(used) >= 0).all() and set(used) == set(range(1, used.max() + 1))
        assert (row[len(used):] == 0).all()


def test_the_rows_of_trls_example_and_a_hand_made_layout():
    # TRL's pack_dataset docstring: [[1,2,3,4],[6,7],[8,9,10],[11]] at seq_length 4 -> rows [0], [2, 3], [1].
    plan = packing.plan_packing([4, 2, 3, 1], 4)
    assert [plan.examples[a:b].tolist() for a, b in itertools.pairwise(plan.row_starts)] == [[0], [2, 3], [1]]
    rows, _ = packing.pack([[5, 6], [7, 8, 9]], [[1, 1], [0, 1, 1]], 6, 0)
    assert rows["input_ids"].tolist() == [[7, 8, 9, 5, 6, 0]]
    assert rows["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0]]
    assert rows["positions"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert rows["weights"].tolist() == [[0, 1, 1, 0, 1, 0]]
    assert packing.next_token_weights(rows["weights"], rows["segment_ids"]).tolist() == [[1, 1, 0, 1, 0, 0]]


def test_best_fit_decreasing_needs_few_rows():
    rng = np.random.default_rng(1)
    at_optimum = 0
    for _ in range(200):
        lengths = rng.integers(1, 11, rng.integers(1, 9)).tolist()
        rows = packing.plan_packing(lengths, 10).num_rows
        best = optimal_rows(sorted(lengths, reverse=True), 10)
        assert best <= rows <= 11 / 9 * best + 6 / 9  # BFD's worst case (Johnson 1973, Dosa 2007)
        at_optimum += rows == best
    assert at_optimum >= 190
    # Best fit where first fit decreasing needs a third row: 16 | 10 + 7, then 3 goes where exactly 3 is free (first
    # fit: into the row of 16), so that the two 2s still fit beside 16.
    plan = packing.plan_packing([2, 10, 3, 16, 2, 7], 20)
    assert [plan.examples[a:b].tolist() for a, b in itertools.pairwise(plan.row_starts)] == [[3, 0, 4], [1, 5, 2]]


def test_a_log_normal_set_of_conversations_fills_over_ninety_percent():
    plan = packing.plan_packing(lognormal_lengths(2000, 2048), 2048)
    assert plan.fill >= 0.9
    assert plan.num_rows == -(-plan.real_tokens // 2048)  # here as few rows as the tokens allow


def test_next_token_weights_never_train_across_examples_or_onto_padding():
    lengths = lognormal_lengths(200, 512, seed=2)
    input_ids, loss_mask = examples_of(lengths, seed=2)
    rows, _ = packing.pack(input_ids, loss_mask, 512, PAD)
    targets = packing.next_token_weights(rows["weights"], rows["segment_ids"])
    assert targets.dtype == np.float32 and (targets[:, -1] == 0).all()
    target_segment = np.roll(rows["segment_ids"], -1, axis=1)
    assert (targets[(target_segment != rows["segment_ids"]) | (rows["segment_ids"] == 0)] == 0).all()
    # Each example's share equals its own next-token weights, as if it were alone in an unpadded row.
    for r, s in zip(*np.nonzero((rows["positions"] == 0) & (rows["segment_ids"] > 0))):
        i = rows["input_ids"][r, s] // 1000
        alone = packing.next_token_weights(np.asarray(loss_mask[i], np.float32), np.ones(lengths[i], np.int32))
        assert targets[r, s:s + lengths[i]].tolist() == alone.tolist() == loss_mask[i][1:] + [0]
    # The shifted weights alone (the run_clm_flax.py loss) agree: first tokens and padding have weight 0.
    assert (np.concatenate([rows["weights"][:, 1:], np.zeros((len(rows["weights"]), 1))], 1) == targets).all()


def test_next_token_weights_are_the_same_with_jax_numpy():
    jnp = pytest.importorskip("jax.numpy")
    # Row 0's weights are 1 on the first token of segment 2 and on padding too: the segments alone stop them.
    weights = np.array([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]], np.float32)
    segment_ids = np.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    expected = packing.next_token_weights(weights, segment_ids)
    assert expected.tolist() == [[1, 1, 0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0]]
    got = packing.next_token_weights(jnp.asarray(weights), jnp.asarray(segment_ids), xp=jnp)
    assert np.asarray(got).tolist() == expected.tolist()


def test_the_same_input_gives_the_same_rows():
    lengths = lognormal_lengths(500, 1024, seed=3)
    lengths[::7] = 300  # many ties: broken by example index
    input_ids, loss_mask = examples_of(lengths)
    (first, plan), (second, again) = (packing.pack(input_ids, loss_mask, 1024, PAD) for _ in range(2))
    assert all((first[k] == second[k]).all() for k in first)
    assert (plan.examples == again.examples).all() and (plan.row_starts == again.row_starts).all()


def test_an_example_of_exactly_block_size_fills_a_row_alone():
    input_ids, loss_mask = examples_of([8, 3, 8, 5])
    rows, plan = packing.pack(input_ids, loss_mask, 8, PAD)
    assert [plan.examples[a:b].tolist() for a, b in itertools.pairwise(plan.row_starts)] == [[0], [2], [3, 1]]
    assert rows["segment_ids"][0].tolist() == [1] * 8 and rows["positions"][0].tolist() == list(range(8))
    assert plan.fill == 1.0


def test_empty_input_and_empty_examples():
    rows, plan = packing.pack([], [], 16, PAD)
    assert plan.num_rows == 0 and plan.fill == 0.0
    assert all(a.shape == (0, 16) for a in rows.values())
    rows, plan = packing.pack([[], [1, 2], []], [[], [1, 1], []], 16, PAD)
    assert plan.examples.tolist() == [1] and rows["input_ids"][0, :3].tolist() == [1, 2, PAD]


def test_bad_examples_are_named():
    with pytest.raises(ValueError, match="Example 1 has 9 tokens, more than block_size=8"):
        packing.plan_packing([3, 9], 8)
    with pytest.raises(ValueError, match="loss_mask is not as long"):
        packing.pack([[1, 2, 3]], [[1, 1]], 8, PAD)


def test_packed_batches_from_a_dataset_are_the_packed_rows():
    lengths = lognormal_lengths(100, 512, seed=4)
    input_ids, loss_mask = examples_of(lengths)
    rows, plan = packing.pack(input_ids, loss_mask, 512, PAD)
    dataset = datasets.Dataset.from_dict({"input_ids": input_ids, "loss_mask": loss_mask})
    some = np.array([3, 0, plan.num_rows - 1])
    batch = packing.packed_batch(dataset, plan, some, PAD)
    assert all((batch[k] == rows[k][some]).all() for k in rows)
    assert {k: v.dtype for k, v in batch.items()} == {"input_ids": np.int32, "weights": np.float32,
                                                      "segment_ids": np.int32, "positions": np.int32}


def test_padded_batches_are_one_example_a_row_at_a_bucket_width():
    assert packing.bucket_lengths(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert packing.bucket_lengths(100) == [16, 32, 64, 100]
    glue = [sorted({min(2 ** k, n) for k in range(4, n.bit_length() + 1)} | {n}) for n in range(1, 3000)]
    assert [packing.bucket_lengths(n) for n in range(1, 3000)] == glue  # the rule run_flax_glue.py had
    assert packing.bucket_lengths(512, per_octave=2) == [16, 32, 48, 64, 96, 128, 192, 256, 368, 512]
    assert packing.bucket_width(packing.bucket_lengths(100), np.array([3, 65, 20])) == 100
    input_ids, loss_mask = examples_of([5, 1, 3])
    dataset = datasets.Dataset.from_dict({"input_ids": input_ids, "loss_mask": loss_mask})
    batch = packing.padded_batch(dataset, np.array([2, 0]), 16, PAD)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0, :4].tolist() == input_ids[2] + [PAD]
    assert batch["segment_ids"][1].tolist() == [1] * 5 + [0] * 11
    assert batch["positions"][1].tolist() == list(range(5)) + [0] * 11
    assert batch["weights"][1].tolist() == [0] + loss_mask[0][1:] + [0] * 11


def test_length_grouped_batches_cover_each_epoch_resume_and_pad_less():
    lengths = lognormal_lengths(1000, 2048, seed=5)
    grouped = list(packing.length_grouped_batches(lengths, 32, seed=0, start_step=0, total_steps=62, group=8))
    assert [(e, i) for e, i, _ in grouped] == [(e, i) for e in range(2) for i in range(31)]
    for epoch in range(2):
        seen = np.concatenate([b for e, _, b in grouped if e == epoch])
        assert len(set(seen.tolist())) == len(seen) == 31 * 32
    assert [b.tolist() for *_, b in grouped] != [b.tolist() for *_, b in grouped[31:] + grouped[:31]]  # reshuffled
    resumed = list(packing.length_grouped_batches(lengths, 32, seed=0, start_step=40, total_steps=62, group=8))
    assert [(e, i, b.tolist()) for e, i, b in resumed] == [(e, i, b.tolist()) for e, i, b in grouped[40:]]
    # Grouped by length, the batches' bucket widths hold less padding than batches of data's plain order.
    buckets = packing.bucket_lengths(2048)
    plain = [b for _, _, b in packing.data.epoch_batches(len(lengths), 32, 0, 0, 31)]
    padded = [sum(packing.bucket_width(buckets, lengths[b]) for b in bs) for bs in ([b for *_, b in grouped], plain)]
    assert padded[0] < 0.6 * padded[1] * len(grouped) / len(plain)


def test_fitted_widths_follow_the_data_and_stay_few():
    lengths = np.array([27, 40, 44, 69, 70, 71, 97, 130])
    assert packing.fitted_widths(lengths, 4, 256) == [48, 80, 112, 144]  # (powers of two: 32, 64, 128, 256)
    assert packing.fitted_widths(lengths, 1, 256) == [144]
    assert packing.fitted_widths(lengths, 4, 100) == [48, 80, 100]  # capped at the maximum
    assert packing.fitted_widths(np.full(50, 7), 4, 256) == [16]  # one length: one width
    widths = packing.fitted_widths(np.random.default_rng(0).integers(1, 1000, 5000), 3, 1024)
    assert len(widths) == 3 and widths[-1] == 1008 and all(w % 16 == 0 for w in widths)
