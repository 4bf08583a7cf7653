"""Weight mapping between pretrain.model.XLMR and Hugging Face `XLMRobertaForMaskedLM`.

Pure state-dict surgery (no transformers import), so export/import code and the tests share
one table. Our fused `qkv` is split into HF's query/key/value and back. Both state dicts list
the tied decoder weight under two names (embedding and decoder), and HF lists the output bias
twice too (lm_head.bias is lm_head.decoder.bias); every name is written.
"""

import torch

from pretrain.model import ModelConfig

# ours -> HF, outside the blocks
_TOP = {
    "tok_emb.weight": "roberta.embeddings.word_embeddings.weight",
    "pos_emb.weight": "roberta.embeddings.position_embeddings.weight",
    "type_emb.weight": "roberta.embeddings.token_type_embeddings.weight",
    "emb_ln.weight": "roberta.embeddings.LayerNorm.weight",
    "emb_ln.bias": "roberta.embeddings.LayerNorm.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.ln.weight": "lm_head.layer_norm.weight",
    "lm_head.ln.bias": "lm_head.layer_norm.bias",
    "lm_head.decoder.bias": "lm_head.bias",
}
# ours -> HF, inside block i (prefix "blocks.{i}." / "roberta.encoder.layer.{i}.")
_BLOCK = {
    "attn.proj": "attention.output.dense",
    "ln_attn": "attention.output.LayerNorm",
    "ffn.fc": "intermediate.dense",
    "ffn.proj": "output.dense",
    "ln_ffn": "output.LayerNorm",
}
_QKV = ("query", "key", "value")
# HF keys that carry nothing we need: tied copies, old persistent buffers, the unused pooler
_HF_SKIP = ("lm_head.decoder.", "roberta.embeddings.position_ids", "roberta.embeddings.token_type_ids", "roberta.pooler.")


def hf_config_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for transformers.XLMRobertaConfig describing the same model."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_positions,
        type_vocab_size=1,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_id,
        bos_token_id=0,
        eos_token_id=2,
    )


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our XLMR state_dict -> an XLMRobertaForMaskedLM state_dict (loads with strict=True)."""
    out = {}
    for key, value in state_dict.items():
        if key == "lm_head.decoder.weight":  # the tied word embedding, written below
            continue
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        _, i, module, param = _split_block_key(key)
        prefix = f"roberta.encoder.layer.{i}."
        if module == "attn.qkv":
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{prefix}attention.self.{name}.{param}"] = part.clone()
        else:
            out[f"{prefix}{_BLOCK[module]}.{param}"] = value
    out["lm_head.decoder.weight"] = out["roberta.embeddings.word_embeddings.weight"]
    out["lm_head.decoder.bias"] = out["lm_head.bias"]
    return out


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An XLMRobertaForMaskedLM state_dict -> our XLMR state_dict (loads with strict=True)."""
    top = {hf: ours for ours, hf in _TOP.items()}
    block = {hf: ours for ours, hf in _BLOCK.items()}
    out, qkv = {}, {}
    for key, value in hf_state_dict.items():
        if key.startswith(_HF_SKIP):
            continue
        if key in top:
            out[top[key]] = value
            continue
        if not key.startswith("roberta.encoder.layer."):
            raise KeyError(f"unexpected HF key {key!r}")
        i, rest = key.removeprefix("roberta.encoder.layer.").split(".", 1)
        module, param = rest.rsplit(".", 1)
        if module.startswith("attention.self."):
            qkv[(i, param, module.removeprefix("attention.self."))] = value
        else:
            out[f"blocks.{i}.{block[module]}.{param}"] = value
    for i, param in sorted({(i, p) for i, p, _ in qkv}):
        out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([qkv[(i, param, name)] for name in _QKV], dim=0)
    out["lm_head.decoder.weight"] = out["tok_emb.weight"]
    return out


def _split_block_key(key: str) -> tuple[str, str, str, str]:
    """'blocks.3.attn.qkv.weight' -> ('blocks', '3', 'attn.qkv', 'weight')."""
    head, i, rest = key.split(".", 2)
    if head != "blocks":
        raise KeyError(f"unexpected key {key!r}")
    module, param = rest.rsplit(".", 1)
    return head, i, module, param
