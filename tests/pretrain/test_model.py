"""pretrain.model against Hugging Face XLMRobertaForMaskedLM with the same (random) weights."""

import pytest
import torch
import torch.nn.functional as F
from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaEmbeddings

import pretrain.model as model_module
from pretrain.interop.hf_convert import from_hf_state_dict, hf_config_kwargs, to_hf_state_dict
from pretrain.model import IGNORE_INDEX, ModelConfig, XLMR, num_parameters, position_ids

V, T, PAD, MASK = 97, 24, 1, 96
TINY = dict(vocab_size=V, hidden_size=64, num_layers=2, num_heads=2, ffn_size=256, max_positions=T + 2)


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def hf_model(cfg: ModelConfig, attn: str = "eager") -> XLMRobertaForMaskedLM:
    return XLMRobertaForMaskedLM(XLMRobertaConfig(**hf_config_kwargs(cfg), attn_implementation=attn)).eval()


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    # The default init (zero biases, unit LayerNorm) would hide a swapped or dropped
    # bias/gain in the weight mapping; random values everywhere expose it.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))


def batch(padded: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """<s> t1 .. t(T-1) rows; with padding, rows 1 and 2 are shorter and end in <pad>s."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, MASK, (3, T), generator=g)
    ids[:, 0] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    for r, c in [(0, 3), (0, 10), (0, T - 1), (1, 1), (1, 5), (2, 2), (2, 7), (2, 8)]:
        labels[r, c] = ids[r, c]
        ids[r, c] = MASK
    if padded:
        ids[1, 9:] = PAD
        ids[2, 12:] = PAD
    return ids, labels


def paired_models(direction: str, attn: str = "eager") -> tuple[XLMR, XLMRobertaForMaskedLM]:
    cfg = tiny_config()
    ours, hf = XLMR(cfg).eval(), hf_model(cfg, attn)
    if direction == "ours_to_hf":
        randomize(ours)
        hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)
    else:
        randomize(hf)
        hf.tie_weights()
        ours.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True)
    return ours, hf


def test_position_ids_match_hf():
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, PAD, PAD], [PAD, PAD, 0, 9, 2]])
    expected = XLMRobertaEmbeddings.create_position_ids_from_input_ids(ids, PAD)
    assert torch.equal(position_ids(ids, PAD), expected)
    # fairseq layout by hand: the first real token sits at pad_id + 1 = 2, pads at pad_id.
    assert position_ids(ids, PAD)[1].tolist() == [2, 3, 4, 1, 1]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("direction", ["ours_to_hf", "hf_to_ours"])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_hf(padded, direction, attn):
    ours, hf = paired_models(direction, attn)
    ids, labels = batch(padded)
    attention_mask = ids.ne(PAD).long()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = ours.encode(ids)
        logits, targets, rows = ours.masked_logits(ids, labels)
    real = attention_mask.bool()  # HF's outputs at padded query positions are not meaningful
    torch.testing.assert_close(hidden[real], ref.hidden_states[-1][real], atol=1e-5, rtol=1e-4)
    selected = labels.ne(IGNORE_INDEX)
    torch.testing.assert_close(logits, ref.logits[selected], atol=1e-5, rtol=1e-4)
    assert torch.equal(targets, labels[selected])
    assert torch.equal(rows, selected.nonzero()[:, 0])


def test_loss_sums_match_cross_entropy():
    ours, hf = paired_models("ours_to_hf")
    ids, labels = batch(padded=True)
    with torch.no_grad():
        out = ours(ids, labels)
        ref_logits = hf(input_ids=ids, attention_mask=ids.ne(PAD).long()).logits
    token_loss = F.cross_entropy(ref_logits.transpose(1, 2), labels, reduction="none")  # 0 where ignored
    assert out.loss_sum.dtype == torch.float32
    torch.testing.assert_close(out.loss_sum, token_loss.sum(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.seq_loss_sum, token_loss.sum(dim=1), atol=1e-4, rtol=1e-5)
    assert out.seq_num_masked.tolist() == [3, 2, 3]
    assert out.num_masked.item() == 8
    selected = labels.ne(IGNORE_INDEX)
    assert out.num_correct.item() == (ref_logits.argmax(-1)[selected] == labels[selected]).sum().item()


def test_no_masked_tokens_gives_zero_loss_with_grad():
    model = XLMR(tiny_config())
    ids, _ = batch(padded=False)
    out = model(ids, torch.full_like(ids, IGNORE_INDEX))
    assert out.loss_sum.item() == 0.0 and out.num_masked.item() == 0
    out.loss_sum.backward()  # a rank with no masked tokens must still join the backward


def test_padding_does_not_change_real_tokens():
    model = XLMR(tiny_config()).eval()
    randomize(model)
    ids, _ = batch(padded=True)
    with torch.no_grad():
        together = model.encode(ids)
        alone = model.encode(ids[1:2, :9])  # row 1 without its padding
    torch.testing.assert_close(together[1, :9], alone[0], atol=1e-5, rtol=1e-4)


def test_unpadded_batch_passes_no_attention_mask(monkeypatch):
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = XLMR(tiny_config()).eval()
    model.encode(batch(padded=False)[0])
    assert len(seen) == 2 and all(m is None for m in seen)  # flash kernels stay eligible on GPU
    seen.clear()
    model.encode(batch(padded=True)[0])
    assert len(seen) == 2 and all(m is not None for m in seen)


def test_embedding_and_decoder_are_one_tensor():
    model = XLMR(tiny_config()).eval()
    randomize(model)
    assert model.lm_head.decoder.weight is model.tok_emb.weight
    vocab_shaped = [n for n, p in model.named_parameters() if p.shape == (V, 64)]
    assert vocab_shaped == ["tok_emb.weight"]  # counted once
    ids, labels = batch(padded=False)
    unused = sorted(set(range(4, MASK)) - set(ids.flatten().tolist()))[0]
    # Zeroing a token's embedding row must zero its decoder row: its logit is then the bias.
    with torch.no_grad():
        model.tok_emb.weight[unused] = 0
        logits, _, _ = model.masked_logits(ids, labels)
    torch.testing.assert_close(logits[:, unused], model.lm_head.decoder.bias[unused].expand(len(logits)))
    # And the decoder's gradient reaches the embedding row of a token that never appears as input.
    model.train()
    model(ids, labels).loss_sum.backward()
    assert model.tok_emb.weight.grad[unused].abs().sum() > 0
    hf = hf_model(tiny_config())
    hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
    assert hf.lm_head.decoder.weight is hf.roberta.embeddings.word_embeddings.weight


def test_activation_checkpointing_gives_same_gradients(monkeypatch):
    ids, labels = batch(padded=True)
    grads = []
    calls = []
    real_checkpoint = model_module.checkpoint
    monkeypatch.setattr(
        model_module, "checkpoint", lambda *a, **kw: calls.append((a[0], kw)) or real_checkpoint(*a, **kw)
    )
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = XLMR(tiny_config(activation_checkpointing=ckpt)).train()  # dropout on
        torch.manual_seed(1)
        model(ids, labels).loss_sum.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    blocks = [kw for fn, kw in calls if isinstance(fn, model_module.Block)]  # the LM head's chunks are checkpointed too
    assert len(blocks) == 2 and all(kw["use_reentrant"] is False for _, kw in calls)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_init_follows_hf():
    cfg = tiny_config(vocab_size=4000, hidden_size=128, ffn_size=512)
    model = XLMR(cfg)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif ".ln" in name or name.startswith(("emb_ln", "lm_head.ln")):
            assert torch.all(p == 1), name
        else:
            rows = [r for r in range(len(p)) if not (name in ("tok_emb.weight", "pos_emb.weight") and r == PAD)]
            assert abs(p[rows].std().item() - 0.02) < 0.003, name
    assert torch.all(model.tok_emb.weight[PAD] == 0) and torch.all(model.pos_emb.weight[PAD] == 0)


def test_hf_state_dict_roundtrip():
    model = XLMR(tiny_config())
    randomize(model)
    sd = model.state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd))
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize(
    "size", [dict(hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072),
             dict(hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096)],
    ids=["base", "large"],
)
def test_num_parameters_matches_hf(size):
    cfg = ModelConfig(vocab_size=250002, **size)
    with torch.device("meta"):  # shapes only: no 250k x 1024 allocation
        ours = XLMR(cfg)
        hf = XLMRobertaForMaskedLM(XLMRobertaConfig(**hf_config_kwargs(cfg)))
    assert num_parameters(ours) == hf.num_parameters()  # the tied decoder counted once
    # HF's exclude_embeddings keeps the tied word matrix (as decoder); ours drops it, by hand:
    H = size["hidden_size"]
    embeddings = 250002 * H + 514 * H + 1 * H
    assert num_parameters(ours, exclude_embeddings=True) == hf.num_parameters() - embeddings
    if H == 768:
        assert num_parameters(ours) == 278_295_186  # xlm-roberta-base, MLM head, no pooler


def hf_grads(hf: XLMRobertaForMaskedLM) -> dict:
    """HF's gradients under our parameter names (hf_convert maps them as it maps weights)."""
    return from_hf_state_dict({n: t.grad if t.grad is not None else torch.zeros_like(t)
                               for n, t in hf.state_dict(keep_vars=True).items()})


@pytest.mark.parametrize("chunk_rows", [2, 1000])
def test_training_path_gives_hfs_loss_and_gradients(monkeypatch, chunk_rows):
    """The training step's path (positions and `padded` from the loader, padded with -1 to a
    bucket; fp32 cross-entropy in checkpointed chunks) against HF's dense logits and a plain
    cross-entropy over every position, on a padded batch: loss sums, counts and gradients."""
    monkeypatch.setattr(model_module, "CE_CHUNK_LOGITS", chunk_rows * V)  # 2 rows: 64 chunks of the 128 positions
    ours, hf = paired_models("ours_to_hf")  # eval mode: no dropout; gradients and the checkpointed chunks still run
    ids, labels = batch(padded=True)
    tokens = torch.where(labels.ne(IGNORE_INDEX), labels, ids)
    from pretrain.masking import masked_batch

    micro = masked_batch({"input_ids": tokens, "lang": torch.zeros(3, dtype=torch.long)}, ids, labels, PAD)
    assert micro["padded"] and micro["positions"].shape == (128,) and micro["num_masked"].item() == 8
    out = ours(micro["input_ids"], micro["labels"], positions=micro["positions"], padded=micro["padded"])
    out.loss_sum.backward()

    ref_logits = hf(input_ids=ids, attention_mask=ids.ne(PAD).long()).logits
    token_loss = F.cross_entropy(ref_logits.transpose(1, 2).float(), labels, reduction="none")  # 0 where ignored
    token_loss.sum().backward()
    torch.testing.assert_close(out.loss_sum, token_loss.sum().detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.seq_loss_sum, token_loss.sum(dim=1).detach(), atol=1e-4, rtol=1e-5)
    assert out.seq_num_masked.tolist() == [3, 2, 3] and out.num_masked.item() == 8
    selected = labels.ne(IGNORE_INDEX)
    assert out.num_correct.item() == (ref_logits.argmax(-1)[selected] == labels[selected]).sum().item()
    expected = hf_grads(hf)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


class HostSyncs(torch.overrides.TorchFunctionMode):
    """Records every tensor call that reads device values on the host (a sync on a GPU)."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "bincount", "cpu",
             "numpy", "unique", "masked_select"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_nothing_back_from_the_device():
    """Forward, backward and the trainer's metric sums of a micro-batch, given what the loader
    made on the host, never read a device value; without them the same forward does."""
    from pretrain.masking import masked_batch
    from pretrain.train import _Interval, _micro_batch_sums

    model = XLMR(tiny_config()).train()
    ids, labels = batch(padded=True)
    micro = masked_batch({"input_ids": torch.where(labels.ne(IGNORE_INDEX), labels, ids),
                          "lang": torch.tensor([0, 1, 0])}, ids, labels, PAD)
    interval = _Interval(2, torch.device("cpu"))
    with HostSyncs() as reads:
        out = model(micro["input_ids"], micro["labels"], positions=micro["positions"], padded=micro["padded"])
        out.loss_sum.backward()
        interval.add(_micro_batch_sums(out, micro, 2), 1e-3, True, torch.tensor(1.0))
    assert reads.calls == []
    with HostSyncs() as reads:  # the detector works: the path without the loader's help reads twice
        model(micro["input_ids"], micro["labels"])
    assert sorted(reads.calls) == ["__bool__", "nonzero"], reads.calls
