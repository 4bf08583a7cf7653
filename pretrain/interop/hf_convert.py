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


# transformers.XLMRobertaConfig's defaults, for keys a config.json leaves out
_HF_DEFAULTS = dict(hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, type_vocab_size=2,
                    initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=1, position_embedding_type="absolute",
                    is_decoder=False, add_cross_attention=False, tie_word_embeddings=True)


def model_config_from_hf(config: dict) -> ModelConfig:
    """The inverse of hf_config_kwargs: a ModelConfig from an HF config.json (as a dict).

    Raises ValueError, naming every offending setting, for configs this model cannot represent:
    it is a post-LayerNorm RoBERTa encoder with exact GELU, fairseq's absolute positions, one
    token type and the decoder tied to the word embedding.
    """
    c = {**_HF_DEFAULTS, **config}
    problems = []
    if c.get("model_type") not in ("xlm-roberta", "roberta"):
        problems.append(f"model_type={c.get('model_type')!r} (need 'xlm-roberta' or 'roberta')")
    if c["hidden_act"] != "gelu":
        problems.append(f"hidden_act={c['hidden_act']!r} (need 'gelu', the exact erf GELU)")
    if c["type_vocab_size"] != 1:
        problems.append(f"type_vocab_size={c['type_vocab_size']} (need 1)")
    if c["position_embedding_type"] != "absolute":
        problems.append(f"position_embedding_type={c['position_embedding_type']!r} (need 'absolute')")
    for flag in ("is_decoder", "add_cross_attention"):
        if c[flag]:
            problems.append(f"{flag}=true (need an encoder without cross-attention)")
    if not c["tie_word_embeddings"]:
        problems.append("tie_word_embeddings=false (the decoder must be the word embedding)")
    if c["pad_token_id"] is None:
        problems.append("pad_token_id=null (positions count from it)")
    if c["hidden_size"] % c["num_attention_heads"]:
        problems.append(f"hidden_size={c['hidden_size']} is not a multiple of num_attention_heads={c['num_attention_heads']}")
    if problems:
        raise ValueError("cannot represent this HF config: " + "; ".join(problems))
    return ModelConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        ffn_size=c["intermediate_size"],
        max_positions=c["max_position_embeddings"],
        dropout=c["hidden_dropout_prob"],
        attention_dropout=c["attention_probs_dropout_prob"],
        layer_norm_eps=c["layer_norm_eps"],
        init_std=c["initializer_range"],
        pad_id=c["pad_token_id"],
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
