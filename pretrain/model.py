"""The XLM-R encoder (RoBERTa layout) with its masked-LM head, in plain torch.

Owns the architecture, its weight init and the MLM loss; knows nothing about processes,
DeepSpeed, data or logging. Numerically it matches Hugging Face `XLMRobertaForMaskedLM`
given the same weights (tests/pretrain/test_model.py checks it; pretrain/interop/hf_convert.py maps
the weights both ways).

Sizes (the Hydra YAML owns the presets; listed here for orientation):
    tiny   2 layers x  64 hidden,  2 heads, FFN  256   (tests)
    base  12 layers x 768 hidden, 12 heads, FFN 3072   (XLM-R base, 278M params with the 250k vocab)
    large 24 layers x 1024 hidden, 16 heads, FFN 4096  (XLM-R large, ~560M params)

Token ids follow the data prep dictionary: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=vocab_size-1.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # label of positions that carry no MLM target (torch cross_entropy default)
# The fp32 cross-entropy runs over chunks of masked positions of at most this many logits
# (256 MB in fp32): 2458 masked positions x 250k vocabulary upcast at once would be 2.5 GB.
CE_CHUNK_LOGITS = 2**26


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: the trainer takes it from the data manifest (spm vocab + 2)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    max_positions: int = 514  # 512 tokens + the pad_id + 1 offset of fairseq positions
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    pad_id: int = 1
    activation_checkpointing: bool = False


def position_ids(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """fairseq `make_positions`: real tokens count up from pad_id + 1, pads sit at pad_id.

    Positions are counted over non-pad tokens only, so left- or right-padding does not shift
    them; that offset is why max_positions is 512 + 2.
    """
    not_pad = input_ids.ne(pad_id).long()
    return torch.cumsum(not_pad, dim=1) * not_pad + pad_id


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.hidden_size % cfg.num_heads == 0
        self.num_heads = cfg.num_heads
        self.dropout = cfg.attention_dropout
        # q, k, v in one matmul; hf_convert splits it into HF's query/key/value.
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.proj = nn.Linear(cfg.ffn_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))  # exact erf GELU, as XLM-R


class Block(nn.Module):
    """Post-LayerNorm block (BERT/RoBERTa): LayerNorm after each residual sum."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln_attn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ln_ffn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.ln_attn(x + self.dropout(self.attn(x, attn_mask)))
        return self.ln_ffn(x + self.dropout(self.ffn(x)))


class LMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder; XLMR ties decoder.weight to the word embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(h))))


class MLMOutput(NamedTuple):
    """Sums, never means: the trainer divides by the masked-token count of the whole
    accumulated, all-reduced batch, so every masked token weighs the same on every rank."""

    loss_sum: torch.Tensor  # fp32 scalar, summed cross-entropy over masked tokens (has grad)
    num_masked: torch.Tensor  # long scalar
    num_correct: torch.Tensor  # long scalar, argmax == target
    seq_loss_sum: torch.Tensor  # [B] fp32, detached: per-sequence sums for per-language loss
    seq_num_masked: torch.Tensor  # [B] long


class XLMR(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size must be set (the trainer reads it from the manifest)"
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_id)
        self.pos_emb = nn.Embedding(cfg.max_positions, cfg.hidden_size, padding_idx=cfg.pad_id)
        # XLM-R keeps BERT's token-type embedding with a single type: a learned bias.
        self.type_emb = nn.Embedding(1, cfg.hidden_size)
        self.emb_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.lm_head = LMHead(cfg)
        # One Parameter registered in both modules (as nanoGPT does), rather than passing the
        # embedding weight into the head: ZeRO-3 gathers a parameter only for the modules that
        # register it, so the head must own it too.
        self.lm_head.decoder.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # HF/fairseq BERT init: N(0, 0.02) everywhere, zero biases, identity LayerNorm,
        # zero padding rows (padding_idx also keeps those rows out of the embedding gradient).
        if isinstance(module, nn.Linear):
            if module.weight is not self.tok_emb.weight:  # re-drawing it would undo the pad row
                nn.init.normal_(module.weight, std=self.cfg.init_std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               num_layers: int | None = None, padded: bool | None = None) -> torch.Tensor:
        """[B, T] token ids -> [B, T, H] final hidden states (HF's sequence output), or those
        after the first `num_layers` blocks (0: the embeddings; the cross-lingual probes read
        a middle layer).

        attention_mask (1 = real token) defaults to `input_ids != pad_id`; `padded` (whether
        any position is padding; None: read from the mask) decides whether attention is masked.
        """
        x = self.tok_emb(input_ids) + self.pos_emb(position_ids(input_ids, self.cfg.pad_id))
        # type_emb is called, not read as .weight, so ZeRO-3's module hooks gather it.
        x = x + self.type_emb(input_ids.new_zeros(1))
        x = self.emb_dropout(self.emb_ln(x))

        if attention_mask is None:
            attention_mask = input_ids.ne(self.cfg.pad_id)
        # Most batches are unpadded (nearly all sequences fill seq_len): no mask then lets SDPA
        # pick the flash kernel on GPU. The trainer's loader knows `padded` on the host; asking
        # the mask instead costs one host sync per forward.
        if padded is None:
            padded = not bool(attention_mask.all())
        attn_mask = attention_mask.bool()[:, None, None, :] if padded else None

        for block in self.blocks[:num_layers]:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
        return x

    def masked_logits(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at the positions where labels != IGNORE_INDEX only.

        Returns (logits [N, V], targets [N], rows [N] = batch index of each target). Dense
        logits would not fit: 32 x 512 tokens x 250k vocab is 8 GB in bf16 alone.
        """
        h = self.encode(input_ids, attention_mask)
        rows, cols = labels.ne(IGNORE_INDEX).nonzero(as_tuple=True)
        logits = self.lm_head(h[rows, cols])
        return logits, labels[rows, cols], rows

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
        positions: torch.Tensor | None = None, padded: bool | None = None,
    ) -> MLMOutput:
        """The MLM loss sums of a batch. The trainer passes what its loader workers computed on
        the host, so that no step waits on the device: `positions` [M], the flat indices (into
        B * T) of the masked positions in order, padded with -1 to a fixed bucket size (a static
        shape for torch.compile), and `padded`. Without them they are read from the tensors
        (a host sync each, fine outside the training step)."""
        B, T = input_ids.shape
        flat_labels = labels.reshape(-1)
        if positions is None:
            positions = flat_labels.ne(IGNORE_INDEX).nonzero().squeeze(1)
        valid = positions.ge(0)
        index = positions.clamp(min=0)
        targets = torch.where(valid, flat_labels[index], IGNORE_INDEX)
        rows = index // T
        h = self.encode(input_ids, attention_mask, padded=padded)
        token_loss, correct = self._masked_losses(h.reshape(B * T, -1).index_select(0, index), targets)
        seq_num_masked = torch.zeros(B, dtype=torch.long, device=rows.device).index_add_(0, rows, valid.long())
        return MLMOutput(
            loss_sum=token_loss.sum(),
            num_masked=seq_num_masked.sum(),
            num_correct=(correct & valid).sum(),
            seq_loss_sum=torch.zeros(B, device=rows.device).index_add_(0, rows, token_loss.detach()),
            seq_num_masked=seq_num_masked,
        )

    def _masked_losses(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[M, H] hidden states at masked positions -> (fp32 cross-entropy [M], 0 where the
        target is IGNORE_INDEX; argmax == target [M]), over chunks of CE_CHUNK_LOGITS logits.
        In training each chunk is checkpointed: its logits are made again in the backward
        rather than kept, so at most one chunk of them ever exists, in either dtype."""
        rows = max(1, CE_CHUNK_LOGITS // self.cfg.vocab_size)
        chunks = [(self._chunk_loss(hc, tc) if not torch.is_grad_enabled()
                   else checkpoint(self._chunk_loss, hc, tc, use_reentrant=False))
                  for hc, tc in zip(h.split(rows), targets.split(rows))]  # one empty chunk when M = 0
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

    def _chunk_loss(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 loss even under bf16 autocast: log-softmax over 250k classes loses precision.
        logits = self.lm_head(h).float()
        loss = F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE_INDEX)
        return loss, logits.detach().argmax(dim=-1) == targets


def num_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameter count, the tied embedding counted once.

    exclude_embeddings drops the token, position and type embeddings: the usual N of the
    6*N*tokens FLOPs estimate. The tied decoder still costs 2*H*V FLOPs per *masked* token in
    the LM head, which an MFU estimate must add separately.
    """
    n = sum(p.numel() for p in model.parameters())  # parameters() yields a shared one once
    if exclude_embeddings:
        n -= sum(e.weight.numel() for e in (model.tok_emb, model.pos_emb, model.type_emb))
    return n
