"""pretrain.masking: statistics, specials, determinism and whole-word masking."""

import math

import pytest
import torch

from pretrain.masking import MaskingConfig, mask_batch, masking_generator, word_start_table
from pretrain.model import IGNORE_INDEX

V = 1000  # ids 0..3 specials, 4..998 pieces, 999 <mask>
MASK = V - 1
BOS, PAD, EOS, UNK = 0, 1, 2, 3


def corpus(rows: int = 512, T: int = 128, seed: int = 0) -> torch.Tensor:
    """<s> pieces ... with a sprinkling of </s> and <unk>, and some rows padded."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, MASK, (rows, T), generator=g)
    tokens[:, 0] = BOS
    sprinkle = torch.rand(rows, T, generator=g)
    tokens[sprinkle < 0.02] = EOS
    tokens[sprinkle > 0.98] = UNK
    for r in range(0, rows, 5):
        tokens[r, T // 2 + r % 7 :] = PAD
    return tokens


def is_special(tokens: torch.Tensor, vocab: int = V) -> torch.Tensor:
    return (tokens <= UNK) | (tokens == vocab - 1)


def run(tokens, cfg=MaskingConfig(), seed=0, **kw):
    return mask_batch(tokens, cfg, masking_generator(seed, 0, 0), vocab_size=kw.pop("vocab_size", V), **kw)


@pytest.mark.parametrize("probs", [(0.15, 0.8, 0.1), (0.3, 0.5, 0.3)])
def test_selection_and_replacement_rates(probs):
    mask_prob, mask_token_prob, random_token_prob = probs
    tokens = corpus()
    inputs, labels = run(tokens, MaskingConfig(mask_prob, mask_token_prob, random_token_prob))
    eligible = ~is_special(tokens)
    selected = labels != IGNORE_INDEX
    # fairseq rounding: each row masks floor(p * n) or floor(p * n) + 1 of its n eligible tokens.
    n = eligible.sum(dim=1).double()
    per_row = selected.sum(dim=1)
    assert torch.all((per_row == (mask_prob * n).floor()) | (per_row == (mask_prob * n).floor() + 1))
    assert abs(selected.sum().item() / eligible.sum().item() - mask_prob) < 0.003

    s = selected.sum().item()
    as_mask = (inputs[selected] == MASK).sum().item() / s
    unchanged = (inputs[selected] == tokens[selected]).sum().item() / s
    replaced = 1 - as_mask - unchanged  # a random draw equal to the original (p = 1/995) counts as unchanged
    tol = 4 * math.sqrt(0.25 / s)  # four binomial sigmas at worst
    assert abs(as_mask - mask_token_prob) < tol
    assert abs(replaced - random_token_prob) < tol
    assert abs(unchanged - (1 - mask_token_prob - random_token_prob)) < tol


def test_labels_hold_originals_only_at_selected_positions():
    tokens = corpus()
    inputs, labels = run(tokens)
    selected = labels != IGNORE_INDEX
    assert torch.equal(labels[selected], tokens[selected])
    assert torch.equal(inputs[~selected], tokens[~selected])
    assert inputs.dtype == labels.dtype == torch.long and inputs.shape == tokens.shape


def test_specials_never_selected_nor_drawn():
    # A tiny vocabulary (non-special ids 4..6 only) and every selected token replaced at
    # random: a replacement drawn from the wrong range would show up at once.
    vocab = 8
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (256, 64), generator=g)  # includes <pad>, <unk>, <mask>=7
    original = tokens.clone()
    inputs, labels = mask_batch(
        tokens, MaskingConfig(0.5, 0.0, 1.0), masking_generator(0, 0, 0), vocab_size=vocab
    )
    assert torch.equal(tokens, original)  # the input is not modified in place
    special = is_special(tokens, vocab)
    assert torch.all(labels[special] == IGNORE_INDEX)
    assert torch.equal(inputs[special], tokens[special])
    selected = labels != IGNORE_INDEX
    assert selected.any()
    assert torch.all((inputs[selected] >= 4) & (inputs[selected] <= vocab - 2))
    assert set(inputs[selected].unique().tolist()) == {4, 5, 6}  # all non-specials reachable


def test_pad_rows_and_int32_tokens():
    tokens = torch.full((4, 16), PAD, dtype=torch.int32)
    tokens[:, 0] = BOS
    inputs, labels = run(tokens, MaskingConfig(mask_prob=1.0))
    assert torch.all(labels == IGNORE_INDEX) and torch.equal(inputs, tokens.long())


def test_same_key_same_mask_other_key_other_mask():
    tokens = corpus(rows=8)

    def masked(seed, step, rank, micro_step):
        return mask_batch(tokens, MaskingConfig(), masking_generator(seed, step, rank, micro_step), vocab_size=V)

    first = masked(7, 100, 3, 1)
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    again = masked(7, 100, 3, 1)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is never touched
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for other in [(8, 100, 3, 1), (7, 101, 3, 1), (7, 100, 4, 1), (7, 100, 3, 2), (7, 3, 100, 1)]:
        assert not torch.equal(masked(*other)[1], first[1]), other


def test_fresh_mask_per_call():
    tokens = corpus(rows=8)
    g = masking_generator(0, 0, 0)
    a = mask_batch(tokens, MaskingConfig(), g, vocab_size=V)[1]
    b = mask_batch(tokens, MaskingConfig(), g, vocab_size=V)[1]
    assert not torch.equal(a, b)


# -- whole-word masking ------------------------------------------------------------------------

PIECES = ["<unk>", "<s>", "</s>"] + [("\u2581w" if i % 3 == 0 else "p") + str(i) for i in range(3, 200)]


def test_word_start_table_follows_dictionary():
    table = word_start_table(PIECES)
    assert table.shape == (len(PIECES) + 2,)
    assert table[:4].all() and table[-1]  # specials and <mask>
    for spm_id in range(3, len(PIECES)):
        assert table[spm_id + 1].item() == PIECES[spm_id].startswith("\u2581"), spm_id


def words_of(row: list[int], table: torch.Tensor, vocab: int) -> list[list[int]]:
    """Positions of each maskable word, by a plain loop: a word begins at a start piece or right
    after a special; specials belong to no word."""
    words, prev_special = [], True
    for pos, tok in enumerate(row):
        special = tok <= UNK or tok == vocab - 1
        if not special:
            if table[tok] or prev_special:
                words.append([])
            words[-1].append(pos)
        prev_special = special
    return words


def test_whole_word_masks_whole_words():
    table = word_start_table(PIECES)
    vocab = len(table)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, vocab - 1, (400, 48), generator=g)
    tokens[:, 0] = BOS
    tokens[:, 1] = 5  # spm id 4 -> "p4": a continuation right after <s> (row cut mid-word)
    tokens[::4, 30:] = PAD
    cfg = MaskingConfig(whole_word=True)
    inputs, labels = mask_batch(tokens, cfg, masking_generator(0, 0, 0), vocab_size=vocab, word_start=table)
    assert torch.all(labels[is_special(tokens, vocab)] == IGNORE_INDEX)

    n_words = n_selected = 0
    outcomes = {"mask": 0, "random": 0, "keep": 0}
    for r in range(len(tokens)):
        for word in words_of(tokens[r].tolist(), table, vocab):
            chosen = [labels[r, p].item() != IGNORE_INDEX for p in word]
            assert all(chosen) or not any(chosen), (r, word)
            n_words += 1
            if not chosen[0]:
                continue
            n_selected += 1
            got = inputs[r, word]
            if torch.all(got == vocab - 1):
                outcomes["mask"] += 1
            elif torch.equal(got, tokens[r, word]):
                outcomes["keep"] += 1
            else:  # random pieces, none of them <mask>
                assert torch.all(got != vocab - 1), (r, word)
                outcomes["random"] += 1
    assert abs(n_selected / n_words - 0.15) < 0.01
    assert abs(outcomes["mask"] / n_selected - 0.8) < 0.04
    assert abs(outcomes["random"] / n_selected - 0.1) < 0.03


def test_whole_word_off_equals_all_pieces_starting_words():
    tokens = corpus(rows=16)
    every = torch.ones(V, dtype=torch.bool)
    a = run(tokens)
    b = run(tokens, MaskingConfig(whole_word=True), word_start=every)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
