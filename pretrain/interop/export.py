"""The `xlmr-export RUN_DIR [STEP] OUT_DIR` command: a checkpoint of xlmr-pretrain as a Hugging
Face transformers XLM-R, which `AutoModelForMaskedLM.from_pretrained(OUT_DIR)` and
`AutoTokenizer.from_pretrained(OUT_DIR)` load offline.

OUT_DIR gets config.json (XLMRobertaForMaskedLM), model.safetensors (the keys HF's own
save_pretrained writes), sentencepiece.bpe.model with the tokenizer files transformers
writes for it (ids as data_prep.dictionary: <mask> last), README.md and xlmr_export.json
(where it came from: run, step, tokens seen, vocabulary sha256).

Everything is written into a temp dir beside OUT_DIR and renamed at the end, so a killed
export never leaves an OUT_DIR that looks complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from pretrain.checkpoint import VOCAB_FILE
from pretrain.config import PretrainError
from pretrain.interop.average import average_tags, load_average
from pretrain.interop.consolidate import PROVENANCE, load_model, resolve_tag
from pretrain.interop.hf_convert import hf_config_kwargs, to_hf_state_dict
from pretrain.model import num_parameters

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Tied copies that HF's save_pretrained leaves out (the embedding and lm_head.bias hold them).
HF_TIED = ("lm_head.decoder.weight", "lm_head.decoder.bias")


def export(run_dir: Path, out_dir: Path, step: Optional[int] = None, dtype: str = "fp32",
           overwrite: bool = False, average: Optional[list[Path]] = None) -> list[str]:
    """Write the HF model of RUN_DIR's checkpoint (of `step`, else the newest) to OUT_DIR, or
    with `average` (tags, average.average_tags) the parameter mean of those checkpoints;
    return the lines to print."""
    tag = average[-1] if average else resolve_tag(run_dir, step)  # before any work: a missing step fails at once
    if _occupied(out_dir) and not overwrite:
        raise PretrainError(f"{out_dir} exists and is not an empty directory: pass --overwrite to replace it")
    loaded = load_average(average) if average else load_model(tag)
    meta = loaded.meta
    n_params = num_parameters(loaded.model)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_model(loaded, tmp, DTYPES[dtype])
        _write_tokenizer(loaded.spm_model, tmp, loaded.config.max_positions - loaded.config.pad_id - 1)
        provenance = {
            "format": "xlmr-export", "source": str(tag.resolve()), "run_dir": str(tag.parent.parent.resolve()),
            "step": meta["step"], "tokens_seen": meta.get("tokens_seen"), "vocab_sha256": meta["vocab_sha256"],
            "manifest_sha256": meta.get("manifest_sha256"), "data_dir": loaded.data_dir,
            "languages": meta.get("languages"), "zero_stage": meta.get("zero_stage"),
            "world_size": meta.get("world_size"), "precision": meta.get("precision"), "dtype": dtype,
            "parameters": n_params, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "averaged": [str(t.resolve()) for t in average] if average else None,
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_readme(provenance), encoding="utf-8")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in out_dir.iterdir())
    return [f"exported {loaded.source}",
            f"model: {n_params:,} parameters ({loaded.config.num_layers} layers x {loaded.config.hidden_size}, "
            f"vocab {loaded.config.vocab_size}), {dtype}",
            f"wrote {out_dir}: {', '.join(files)}"]


def _write_model(loaded, out: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file
    from transformers import XLMRobertaConfig

    config = XLMRobertaConfig(**hf_config_kwargs(loaded.config), architectures=["XLMRobertaForMaskedLM"])
    config.dtype = dtype  # what from_pretrained(dtype="auto") loads it as
    config.save_pretrained(out)
    # The model's tensors are the consolidated weights themselves: in fp32 nothing is copied
    # but q/k/v (split out of our fused qkv); another dtype converts into one more copy.
    state = {k: v.to(dtype) for k, v in to_hf_state_dict(loaded.model.state_dict()).items() if k not in HF_TIED}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})


def _write_tokenizer(spm_model: Path, out: Path, max_length: int) -> None:
    """sentencepiece.bpe.model, and the files transformers writes for the XLM-R tokenizer it
    builds from it (its ids are data_prep.dictionary's: fairseq's offset, <mask> last)."""
    from transformers import XLMRobertaTokenizer

    shutil.copyfile(spm_model, out / VOCAB_FILE)
    XLMRobertaTokenizer.from_pretrained(str(out), model_max_length=max_length).save_pretrained(str(out))


def _readme(p: dict) -> str:
    return f"""# XLM-R masked language model (xlmr-pretrain, step {p['step']})

Trained with xlmr-pretrain; exported by xlmr-export from `{p['source']}`.

- step {p['step']}, {p['tokens_seen']:,} tokens seen; {p['parameters']:,} parameters, weights in {p['dtype']}
- vocabulary: `sentencepiece.bpe.model`, sha256 {p['vocab_sha256']}
- data: `{p['data_dir']}`
{"- weights: the parameter mean of " + ", ".join(f"`{a}`" for a in p["averaged"]) if p["averaged"] else ""}

```python
from transformers import AutoModelForMaskedLM, AutoTokenizer
model = AutoModelForMaskedLM.from_pretrained("PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
```

`{PROVENANCE}` records the rest (ZeRO stage, ranks, precision, languages).
"""


def _occupied(path: Path) -> bool:
    """Something is there, other than an empty dir."""
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename tmp to out_dir; an old out_dir is moved aside first and removed after."""
    old = None
    if _occupied(out_dir):
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)  # onto an empty dir, or where nothing is
    if old is not None and old.is_dir():
        shutil.rmtree(old)
    elif old is not None:
        old.unlink()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="xlmr-export", description="Export a checkpoint of xlmr-pretrain as a Hugging Face XLM-R "
        "(AutoModelForMaskedLM + AutoTokenizer).")
    parser.add_argument("run_dir", type=Path, help="a run dir of xlmr-pretrain, its checkpoints/ dir or a checkpoint tag")
    parser.add_argument("step", type=int, nargs="?", default=None, help="the step to export (default: the newest)")
    parser.add_argument("out_dir", type=Path, help="where to write the Hugging Face model")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights dtype (default fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--average", type=int, metavar="K", default=None,
                        help="export the parameter mean of the newest K complete checkpoints")
    parser.add_argument("--average-steps", type=int, nargs="+", metavar="STEP", default=None,
                        help="export the parameter mean of the checkpoints of these steps")
    args = parser.parse_args(argv)
    try:
        if (args.average or args.average_steps) and args.step is not None:
            raise PretrainError("give a STEP or --average / --average-steps, not both")
        tags = average_tags(args.run_dir, args.average, args.average_steps) if args.average or args.average_steps else None
        lines = export(args.run_dir, args.out_dir, args.step, args.dtype, args.overwrite, tags)
    except (PretrainError, OSError) as exc:  # OSError: a full disk, a read-only OUT_DIR
        print(f"xlmr-export: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
