"""RoBERTa dynamic masking: a fresh MLM mask every time a batch is drawn.

Selection follows fairseq's MaskTokensDataset: each sequence gets exactly
floor(mask_prob * n + u), u ~ U[0, 1), masked units (tokens, or words with whole_word), chosen
uniformly among its n non-special units; the expectation is mask_prob * n with less spread than
per-token Bernoulli draws. Each selected unit then independently becomes <mask>
(mask_token_prob), a random non-special token (random_token_prob) or stays as it is (the rest).
With whole_word the 80/10/10 decision is made per word, as in fairseq, so a word is never half
<mask>, half visible.

Randomness comes only from the torch.Generator passed in; `masking_generator` derives it from
(seed, step, rank, micro_step) so a resumed run masks exactly as an uninterrupted one.

Specials (never selected, never drawn as replacements): ids below num_special (<s>=0, <pad>=1,
</s>=2, <unk>=3) and <mask>=vocab_size-1, the data prep dictionary.
"""

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from pretrain.model import IGNORE_INDEX

NUM_SPECIAL = 4  # <s>, <pad>, </s>, <unk>
WORD_START = "\u2581"  # SentencePiece's "▁" marks a piece that begins a word


@dataclass
class MaskingConfig:
    mask_prob: float = 0.15  # the masking rate; with a schedule, its value up to schedule_start
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1  # the remaining 1 - 0.8 - 0.1 stay unchanged
    whole_word: bool = False
    # The rate over training (schedules.mask_prob_at): constant | linear | cosine | step,
    # from mask_prob at schedule_start to end_mask_prob at schedule_end (null: trainer.max_steps).
    schedule: str = "constant"
    end_mask_prob: float = 0.15
    schedule_start: int = 0
    schedule_end: Optional[int] = None


def keyed_generator(*key) -> torch.Generator:
    """A CPU generator seeded from a key, independent of any global RNG. The key is hashed
    rather than added up so that no two keys share a stream and neighbouring seeds give
    unrelated masks."""
    digest = hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)  # 63 bits: a valid torch seed


def masking_generator(seed: int, step: int, rank: int, micro_step: int = 0) -> torch.Generator:
    """The generator of a training micro-batch's masks: a function of its place in training."""
    return keyed_generator(seed, step, rank, micro_step)


def word_start_table(spm_pieces: Sequence[str]) -> torch.Tensor:
    """[vocab_size] bool: which model ids begin a word, for whole-word masking.

    spm_pieces[i] is the SentencePiece piece of spm id i (`sp.id_to_piece(i)`); spm ids 0..2 are
    its own specials and spm id i >= 3 is model id i + 1. Specials and <mask> count as starts.
    """
    starts = torch.ones(len(spm_pieces) + 2, dtype=torch.bool)
    starts[NUM_SPECIAL:-1] = torch.tensor([p.startswith(WORD_START) for p in spm_pieces[3:]], dtype=torch.bool)
    return starts


def load_word_starts(spm_model) -> torch.Tensor:
    """word_start_table of a SentencePiece model file (our dictionary's ids)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    return word_start_table([sp.id_to_piece(i) for i in range(sp.get_piece_size())])


def mask_batch(
    tokens: torch.Tensor,
    cfg: MaskingConfig,
    generator: torch.Generator,
    *,
    vocab_size: int,
    num_special: int = NUM_SPECIAL,
    word_start: torch.Tensor | None = None,
    mask_prob: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] token ids -> (input_ids, labels), both long [B, T].

    ``mask_prob`` is the step's masking rate (schedules.mask_prob_at); None: cfg.mask_prob.

    labels hold the original token at selected positions and IGNORE_INDEX elsewhere. The random
    numbers are drawn on the generator's device (CPU) and moved, so a mask depends only on the
    generator's state, never on where the tokens live.
    """
    mask_id = vocab_size - 1
    tokens = tokens.long()
    B, T = tokens.shape

    def rand(*size: int) -> torch.Tensor:
        return torch.rand(size, generator=generator, device=generator.device).to(tokens.device)

    special = (tokens < num_special) | (tokens == mask_id)
    if cfg.whole_word:
        assert word_start is not None, "whole_word masking needs the word_start table"
        starts = word_start.to(tokens.device)[tokens] | special
        # A piece right after a special (a sequence cut mid-word after <s>) opens its own word,
        # so no word ever contains a special.
        starts[:, 1:] |= special[:, :-1]
        starts[:, 0] = True  # a row that begins mid-word still begins a (partial) word
    else:
        starts = torch.ones_like(special)
    # Every token looks up the position of its word's first piece: decisions are made there.
    cols = torch.arange(T, device=tokens.device).expand(B, T)
    word_pos = torch.where(starts, cols, 0).cummax(dim=1).values

    # Choose k of the n eligible word starts uniformly: rank random scores, ineligible last.
    candidate = starts & ~special
    n = candidate.sum(dim=1)
    rate = cfg.mask_prob if mask_prob is None else mask_prob
    k = (rate * n + rand(B)).floor().long()
    score = torch.where(candidate, rand(B, T), 2.0)  # rand < 1, so 2.0 ranks after them
    rank = score.argsort(dim=1, stable=True).argsort(dim=1)
    selected = (rank < k[:, None]).gather(1, word_pos)

    action = rand(B, T).gather(1, word_pos)  # one draw per word decides mask / random / keep
    to_mask = selected & (action < cfg.mask_token_prob)
    to_random = selected & ~to_mask & (action < cfg.mask_token_prob + cfg.random_token_prob)
    random_ids = torch.randint(
        num_special, mask_id, (B, T), generator=generator, device=generator.device
    ).to(tokens.device)

    input_ids = torch.where(to_mask, mask_id, torch.where(to_random, random_ids, tokens))
    labels = torch.where(selected, tokens, IGNORE_INDEX)
    return input_ids, labels


# The masked positions a micro-batch hands the model are padded (with -1) to a multiple of
# this: few distinct shapes, so torch.compile compiles few graphs.
POSITION_BUCKET = 128


@dataclass
class TrainMasking:
    """The masks of a rank's training micro-batches, made where the batches are made (in the
    loader workers). Micro-batch `index` (counted over the run, as `consumed_micro_batches`)
    belongs to step first_step + (index - first_index) // micro_batches_per_step, and its
    mask comes from masking_generator(seed, that step, rank, its place in the step): the same
    function of the training position as before, so a resumed run masks alike."""

    cfg: MaskingConfig
    seed: int
    rank: int
    vocab_size: int
    micro_batches_per_step: int
    max_steps: int  # the masking-rate schedule's default end
    first_step: int = 0
    first_index: int = 0  # consumed_micro_batches when the loader was made (at first_step)
    word_start: Optional[torch.Tensor] = None
    pad_id: int = 1

    def step_of(self, index: int) -> tuple[int, int]:
        """(step, micro-batch within the step) of micro-batch `index`."""
        steps, micro = divmod(index - self.first_index, self.micro_batches_per_step)
        return self.first_step + steps, micro

    def __call__(self, batch: dict, index: int, mask_prob: float) -> dict:
        step, micro = self.step_of(index)
        tokens = batch["input_ids"]
        input_ids, labels = mask_batch(tokens, self.cfg, masking_generator(self.seed, step, self.rank, micro),
                                       vocab_size=self.vocab_size, word_start=self.word_start, mask_prob=mask_prob)
        return masked_batch(batch, input_ids, labels, self.pad_id)


def masked_batch(batch: dict, input_ids: torch.Tensor, labels: torch.Tensor, pad_id: int) -> dict:
    """A training micro-batch with everything its step needs computed on the host, so the step
    never asks the device: input_ids (masked) and labels [B, T]; positions [M], the flat
    indices of the masked positions in order, padded with -1 to a multiple of POSITION_BUCKET;
    num_masked (a 0-d tensor: it travels to the device with the batch); padded (a bool: any
    <pad> at all); seq_tokens [B], the non-pad tokens per sequence; and the batch's lang and keys."""
    tokens = batch["input_ids"]
    positions = labels.reshape(-1).ne(IGNORE_INDEX).nonzero().squeeze(1)
    n = positions.numel()
    padding = -n % POSITION_BUCKET
    not_pad = tokens.ne(pad_id)
    return {**batch, "input_ids": input_ids, "labels": labels,
            "positions": torch.cat([positions, positions.new_full((padding,), -1)]),
            "num_masked": torch.tensor(n), "padded": not bool(not_pad.all()), "seq_tokens": not_pad.sum(dim=1)}
