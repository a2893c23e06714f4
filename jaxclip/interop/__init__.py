"""Interop with Hugging Face transformers and open_clip checkpoints, and pretrained weights.

  sources    read any checkpoint dir (jaxclip params dir, workdir, HF CLIPModel / BertModel,
             open_clip) into one form; write jaxclip params dirs (`jaxclip convert`)
  export     workdir -> HF CLIPModel or open_clip dir (`jaxclip export`)
  init       initialise a fresh training run from pretrained weights (`init.path/select`)
  api        `jaxclip.load(PATH)`: embed images and texts
  mapping    the rule engine behind every name/layout mapping; hf_clip, openclip and hf_bert
             hold the rules and config translations per format
  tensorfile streaming safetensors reader/writer (numpy only)
  workdir    sharded restore of a workdir's parameters, per-tensor fetch
Docs: docs/interop.md. None of this needs torch; the parity tests compare against it.
"""
