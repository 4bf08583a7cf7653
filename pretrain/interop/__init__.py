"""Interop with Hugging Face transformers: the weight mapping between our XLMR and
`XLMRobertaForMaskedLM` (hf_convert), reading weights out of any checkpoint or HF dir
(consolidate), and `xlmr-export` (export)."""
