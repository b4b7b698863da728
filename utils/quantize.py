"""Quantize a loaded stage's LLM in place, as a quantized deployment would run it: every nn.Linear of the
transformer's body becomes a bitsandbytes 4-bit NF4 (`nf4`) or 8-bit LLM.int8() (`int8`) layer; the output head
stays in full precision, as transformers' BitsAndBytesConfig leaves it.

Why in place rather than a reload through `from_pretrained(quantization_config=...)`: a stage's weights are often
built, not saved (QLoRA merged into its base, a baseline's LoRA merged, a soft prompt on a frozen model, ECO's
gate), and every stage loads through utils/stages.py. Quantizing the loaded model serves all of them alike, and
gives the very weights and logits of a save-and-reload through transformers with the same settings
(tests/test_audit.py checks it bit for bit): NF4 with `bnb_4bit_use_double_quant=False` and fp32 compute,
LLM.int8() with the default outlier threshold 6.0 on the fp16-cast weight.

What is not the LLM's is left alone: a soft prompt's encoder (SPUL runs its own prompt in front of the quantized
model), ECO's and the filter's classifiers (scikit-learn).
"""
import torch
from torch import nn

from .cli import UserError

KINDS = ("nf4", "int8")
INT8_THRESHOLD = 6.0  # BitsAndBytesConfig's llm_int8_threshold default
SKIPPED = ("prompt_encoder",)  # PEFT's P-tuning encoder: the prompt, not the deployed LLM


def deployed_lms(model):
    """The transformers models inside a stage's wrapper (the LLM it deploys), outermost first, no duplicates."""
    from transformers import PreTrainedModel

    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
            seen.update(id(sub) for sub in m.modules())
    if not out:
        raise UserError(f"no transformers model inside {type(model).__name__}: nothing to quantize")
    return out


def _quantized_linear(linear, kind):
    import bitsandbytes as bnb

    weight = linear.weight.data
    if kind == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=weight.dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=False)
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
        q.weight = bnb.nn.Int8Params(weight.half(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    q.train(linear.training)
    return q.to(weight.device)  # the move is what quantizes the weight


def quantize_(model, kind):
    """Replace the body's nn.Linear layers of every LLM in `model` by bitsandbytes layers of `kind`, in place.
    Returns the number of layers replaced."""
    if kind not in KINDS:
        raise UserError(f"unknown quantization '{kind}': choose one of {', '.join(KINDS)}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise UserError(f"a {kind} audit needs bitsandbytes: {e}")
    n = 0
    for lm in deployed_lms(model):
        head = lm.get_output_embeddings()
        for parent_name, parent in list(lm.named_modules()):
            if any(s in parent_name.split(".") for s in SKIPPED):
                continue
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child is not head and name not in SKIPPED:
                    if child.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                        raise UserError(f"cannot quantize {name}: its weights are {child.weight.dtype}")
                    setattr(parent, name, _quantized_linear(child, kind))
                    n += 1
    if n == 0:
        raise UserError(f"{type(model).__name__} has no linear layers that bitsandbytes can quantize to {kind}")
    return n
