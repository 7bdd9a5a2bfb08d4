"""Engine: load an artifact and run it (forward, generate with a KV cache, embed for encoders)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from lowbit.format import artifact
from lowbit.format.signing import open_manifest
from lowbit import targets
from lowbit.errors import LowbitError
from lowbit.format.program import mask_positions
from lowbit.runtime.sampling import GenerationSettings
from lowbit.runtime.text import TextGeneration
from lowbit.runtime.tokenizer_files import tokenizer_file


class Engine(TextGeneration):
    """A loaded artifact. ``Engine.load(dir)``; then ``forward``, ``generate``, ``stream``, ``chat`` or ``embed``.

    The backend is a runner with ``full(ids, mask)`` (logits or hidden states of whole sequences),
    ``start(batch, capacity)`` (an empty KV cache for up to ``capacity`` positions) and ``step(ids, mask, positions, cache)`` (logits, cache).
    """

    def __init__(self, path: Path, manifest: dict, runner, tokenizer, backend: str, generation: dict,
                 tokenizer_folder: Optional[Path] = None):
        self.path, self.manifest, self.runner, self.tokenizer, self.backend = path, manifest, runner, tokenizer, backend
        self.task = manifest["source"]["task"]
        self.max_positions = int(generation["max_positions"])
        self._text = HFText(tokenizer, tokenizer_folder) if tokenizer is not None else None
        self._eos = list(generation.get("eos_token_ids") or []) or (
            [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else [])

    @classmethod
    def load(cls, path, backend: str = "auto", dtype=None, verify=True, provider: str = "auto",
             threads: int = 0, device: str = "cpu", kernels: str = "auto") -> "Engine":
        """Load an artifact. ``backend``: torch, ort (ONNX Runtime; ``provider`` auto/cpu/cuda), or auto (ort
        for artifacts compiled with --target onnx, torch otherwise). The torch backend runs on ``device``
        (cpu, the default; cuda[:N], where the lowbit ops run Triton kernels; or auto) in ``dtype`` (default
        float32 on CPU, float16 on CUDA), with ``kernels`` auto (the fastest the device has) or reference (the
        ops' reference kernels, the oracle the others are tested against). ``verify``: True (default) checks every
        file's sha256 against the manifest; a public key file also checks the artifact's signature
        (``lowbit sign``); False checks only the manifest's structure and file list."""
        from lowbit.device import pick_device, pick_dtype

        path = Path(path)
        if backend != "auto" and backend not in targets.BACKENDS:
            raise LowbitError(f"unknown backend '{backend}'; available: auto, {', '.join(targets.BACKENDS)}")
        device = pick_device(device)
        explicit_dtype = dtype not in (None, "auto")
        dtype = pick_dtype(dtype, device)
        manifest = open_manifest(path, verify)
        backend = targets.backend_for(manifest.get("target"), backend, f"artifact '{path}'")
        runner = targets.backend(backend).open(path, manifest, device=device, dtype=dtype,
                                               explicit_dtype=explicit_dtype, provider=provider, threads=threads,
                                               kernels=kernels)
        generation = artifact.generation_info(path, manifest)
        folder = artifact.listed_folder(path, manifest, "tokenizer")
        return cls(path, manifest, runner, load_tokenizer(folder), backend, generation, folder)

    # ---- forward ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                past_key_values=None, position_ids: Optional[torch.Tensor] = None):
        """Logits [B, T, V] for a causal LM (hidden states for an encoder); with a cache or positions, returns
        (logits, cache): pass the cache back for the next step."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.task == "encoder" or (past_key_values is None and position_ids is None):
            return self.runner.full(input_ids, attention_mask)
        if past_key_values is None:
            past_key_values = self.runner.start(input_ids.shape[0])
        if position_ids is None:
            position_ids = mask_positions(attention_mask)[:, -input_ids.shape[1]:]
        return self.runner.step(input_ids, attention_mask, position_ids, past_key_values)

    __call__ = forward

    # ---- generation (text: runtime.text.TextGeneration) --------------------------------------
    @torch.inference_mode()         # every generation path (generate_ids, text, the batcher) steps through here
    def _step_np(self, ids, mask, positions, cache):
        logits, cache = self.runner.step(*(torch.from_numpy(a) for a in (ids, mask, positions)), cache)
        # The next token is picked on the CPU whatever the device: the last position's logits only.
        return logits[:, -1, :].float().cpu().numpy(), cache

    @torch.inference_mode()
    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 32,
                     **settings) -> torch.Tensor:
        """Token ids [B, T + new] from left-padded ids; one prefill, then one cached step per token
        (``runtime.generation``, the loop and sampler every backend shares: the same seed, the same tokens).
        Settings: ``runtime.sampling.GenerationSettings``."""
        s = GenerationSettings.of(max_new_tokens=max_new_tokens, **settings)
        return torch.from_numpy(self._generate_np(input_ids.cpu().numpy(), attention_mask.cpu().numpy(), s))

    # ---- encoders --------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, sentences: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Mean-pooled sentence embeddings [S, H] (encoders)."""
        if self.task != "encoder":
            raise LowbitError("embed needs an encoder artifact; this one is a causal LM")
        out = []
        for i in range(0, len(sentences), batch_size):
            enc = self.tokenizer(list(sentences[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True)
            hidden = self.forward(enc["input_ids"], enc["attention_mask"]).float().cpu()
            out.append(mean_pool(hidden, enc["attention_mask"]))
        return torch.cat(out)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class HFText:
    """A transformers tokenizer as ``TextGeneration`` uses it."""

    def __init__(self, tok, folder: Path):
        self.tok, self.folder = tok, folder
        ids = (tok.pad_token_id, tok.eos_token_id, 0)
        self.pad_id = next(i for i in ids if i is not None)
        self.vocab_size = len(tok)

    def encode(self, texts: list, add_special_tokens: bool = True) -> list[list[int]]:
        return [list(r) for r in self.tok(texts, add_special_tokens=add_special_tokens)["input_ids"]]

    def decode(self, ids: list) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: Path):
    """The tokenizer in folder ``path`` (an artifact's ``tokenizer/``), or None when there is none: from its
    tokenizer.json through the tokenizers backend, data only. AutoTokenizer is never used: it would import
    transformers' model registry (``models.auto.modeling_auto``), which the runtime does not need, and could
    run code the folder ships (``auto_map``)."""
    if not tokenizer_file(path):
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


def load(path, backend: str = "auto", **kw) -> Engine:
    """``lowbit.load(dir)``: the Engine for an artifact folder."""
    return Engine.load(path, backend=backend, **kw)
