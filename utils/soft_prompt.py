"""The soft-prompt model: a frozen causal LM with a PEFT P-tuning prompt encoder in front of every query.

Two forwards compute the same logits and prompt-encoder gradients (in float64 they agree to 1e-12; in
fp32 to float rounding):
- full: the p virtual tokens are prepended to every row and the whole sequence runs (the original path);
- shared prefix (default): in a causal decoder the virtual tokens come first and attend only to each
  other, so their keys/values at every layer are the same for every row. They are computed once, as a
  batch of one, and each row's real tokens run on top of them as past keys/values. Training computes
  them afresh each forward (gradients flow back through them into the prompt encoder, summed over
  rows by the broadcast); inference computes them once and reuses them until the prompt encoder changes.

Position ids are counted over real tokens after the p virtual positions in both paths, so left padding
never shifts the scored positions.
"""
import contextlib
import functools
import inspect

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from .modeling import tail_logits
from .prompts import position_ids_from_mask

# architectures whose layers are checked to give the full path's numbers (tests/test_shared_prefix.py)
SHARED_PREFIX_MODEL_TYPES = ("llama", "opt")
SHARED_PREFIX_ATTENTION = ("eager", "sdpa")


def build_prompt_model(lm, num_tokens, hidden_size, shared_prefix=True):
    """PEFT P-tuning (MLP reparameterisation) on top of the frozen LM, wrapped for tail-only forwards."""
    from peft import PromptEncoderConfig, PromptEncoderReparameterizationType, get_peft_model

    for p in lm.parameters():
        p.requires_grad_(False)
    cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_tokens, encoder_hidden_size=hidden_size,
                              encoder_reparameterization_type=PromptEncoderReparameterizationType.MLP)
    peft_model = get_peft_model(lm, cfg)
    peft_model.prompt_encoder.float()  # trainable part in fp32 even when the LLM runs in bf16
    return SoftPromptLM(peft_model, shared_prefix)


class SoftPromptLM(nn.Module):
    """model(input_ids, attention_mask, keep=1, reference=False) -> logits of the last `keep` positions [B, keep, V].

    Batches are left-padded. `reference=True` runs the frozen model without the prompt (the KL
    reference of the paper). `shared_prefix` picks the path (see the module docstring); a model the
    shared path cannot serve runs the full path, and says so once.
    """

    def __init__(self, peft_model, shared_prefix=True):
        super().__init__()
        self.peft_model = peft_model
        self.shared_prefix = shared_prefix
        self._cached_prefix = None  # (prompt-encoder state, keys/values) for inference
        self._notices = set()

    @property
    def lm(self):
        return self.peft_model.get_base_model()

    def forward(self, input_ids, attention_mask, keep=1, reference=False):
        if reference:
            return tail_logits(self.lm, input_ids, attention_mask, keep)
        if self.shared_prefix and self._shared_prefix_usable():
            return self._shared_forward(input_ids, attention_mask, keep)
        return self._full_forward(input_ids, attention_mask, keep)

    def _full_forward(self, input_ids, attention_mask, keep):
        embeds = self.lm.get_input_embeddings()(input_ids)
        virtual = self.peft_model.get_prompt(batch_size=input_ids.shape[0]).to(embeds.dtype)
        embeds = torch.cat([virtual, embeds], dim=1)
        mask = torch.cat([attention_mask.new_ones(virtual.shape[:2]), attention_mask], dim=1)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                      logits_to_keep=keep, use_cache=False)
        return out.logits

    # ------------------------------------------------------------ the shared prefix

    def _shared_forward(self, input_ids, attention_mask, keep):
        return forward_on_prefix(self.lm, self._prefix(), input_ids, attention_mask, keep)

    def _prefix(self):
        """Per layer (keys, values) of the virtual tokens [1, heads, p, dim]: afresh while gradients can flow
        (the prompt encoder changes every step), else once until the prompt encoder's weights change."""
        if self.lm.training or torch.is_grad_enabled():
            self._cached_prefix = None
            return self._run_prefix()
        state = self._prompt_state()
        if self._cached_prefix is None or self._cached_prefix[0] != state:
            self._cached_prefix = (state, self._run_prefix())
        return self._cached_prefix[1]

    def _run_prefix(self):
        """The virtual tokens through the LM as a batch of one at positions 0..p-1, their keys/values recorded."""
        weight = self.lm.get_input_embeddings().weight
        return run_prefix(self.lm, inputs_embeds=self.peft_model.get_prompt(batch_size=1).to(weight.dtype))

    def _prompt_state(self):
        """Changes whenever the prompt encoder's weights do (an in-place update bumps a tensor's version),
        or the adapter, device, dtype or autocast the prefix is computed for."""
        enc = self.peft_model.prompt_encoder[self.peft_model.active_adapter]
        return (self.peft_model.active_adapter, *compute_state(self.lm),
                tuple((id(p), p._version, p.device, p.dtype) for p in enc.parameters()))

    def _shared_prefix_usable(self):
        reason = shared_prefix_blocker(self.lm)
        if reason is None:
            return True
        if reason not in self._notices:
            self._notices.add(reason)
            print(f"shared soft-prompt prefix off: {reason}; running the full path (p virtual tokens in every row)")
        return False


def compute_state(lm):
    """The device, dtype and autocast a prefix of `lm` is computed for: a cached prefix is stale when they change."""
    weight = lm.get_input_embeddings().weight
    kind = weight.device.type
    return weight.device, weight.dtype, torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind)


def run_prefix(lm, **inputs):
    """A prefix shared by every row (`inputs_embeds` or `input_ids`, a batch of one) through the LM at positions
    0..p-1: per layer its (keys, values) [1, heads, p, dim]."""
    first = next(iter(inputs.values()))
    positions = torch.arange(first.shape[1], device=first.device)[None]
    cache = Cache(layer_class_to_replicate=_RecordLayer)
    with _cache_kept_under_checkpointing(lm):
        lm.base_model(**inputs, position_ids=positions, **{_cache_kwarg(type(lm.base_model)): cache}, use_cache=False)
    n_layers = lm.config.get_text_config().num_hidden_layers
    if len(cache.layers) != n_layers or not all(layer.is_initialized for layer in cache.layers):
        raise RuntimeError(f"the LM recorded the prefix in {len(cache.layers)} of {n_layers} layers")
    return [(layer.keys, layer.values) for layer in cache.layers]


def forward_on_prefix(lm, prefix, input_ids, attention_mask, keep=1):
    """Logits of the last `keep` positions of left-padded rows that each follow `prefix` (run_prefix's keys/values):
    the rows run on top of it as past keys/values, positions counted on after it."""
    p = prefix[0][0].shape[-2]
    mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], p), attention_mask], dim=1)
    cache = SharedPrefixCache(prefix)
    with _cache_kept_under_checkpointing(lm):
        out = lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)[:, p:],
                 **{_cache_kwarg(type(lm)): cache}, logits_to_keep=keep, use_cache=False)
    if cache.read_layers != set(range(len(prefix))):  # a layer ran without the prefix: never a silent difference
        raise RuntimeError(f"the LM read the shared prefix in layers {sorted(cache.read_layers)} of {len(prefix)}")
    return out.logits


def shared_prefix_blocker(lm):
    """Why this forward cannot take the shared prefix with the full path's numbers, or None."""
    cfg = lm.config.get_text_config()
    if cfg.model_type not in SHARED_PREFIX_MODEL_TYPES:
        return f"model type '{cfg.model_type}' is not verified for it (verified: {', '.join(SHARED_PREFIX_MODEL_TYPES)})"
    if cfg._attn_implementation not in SHARED_PREFIX_ATTENTION:
        return f"attention '{cfg._attn_implementation}' is not verified for it"
    if not lm.training:
        return None
    drops = {k: v for k, v in cfg.to_dict().items() if "drop" in k and isinstance(v, float) and v > 0}
    if drops:  # every row draws its own dropout mask over the virtual tokens in the full path
        return f"dropout in training ({', '.join(f'{k}={v}' for k, v in sorted(drops.items()))})"
    checkpointed = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if checkpointed and "_can_checkpoint_with_cache" not in vars(GradientCheckpointingLayer):
        return "this transformers version drops past keys/values under gradient checkpointing"
    if any(getattr(m._gradient_checkpointing_func, "keywords", {}).get("use_reentrant") is not False for m in checkpointed):
        return "reentrant gradient checkpointing carries no gradient through past keys/values"
    return None


@functools.lru_cache
def _cache_kwarg(model_class):
    """The name the class's forward takes past keys/values by (read once per class): transformers 5.24 renamed
    past_key_values to cache (the old name is accepted until 5.40, after which it would land in **kwargs unread)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@contextlib.contextmanager
def _cache_kept_under_checkpointing(lm):
    """GradientCheckpointingLayer drops the past keys/values (`cache` from transformers 5.24, `past_key_values`
    before) in training unless the layer declares that it only reads its cache. The caches here give the same
    answer on the backward replay as in the forward (SharedPrefixCache stores nothing, _RecordLayer overwrites
    with equal states), so declare it for this forward only: the LM's layers are left as they were for any
    other cache."""
    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    saved = [m.__dict__.get("_can_checkpoint_with_cache") for m in layers]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m, old in zip(layers, saved):
            if old is None:
                del m._can_checkpoint_with_cache
            else:
                m._can_checkpoint_with_cache = old


class _RecordLayer(DynamicLayer):
    """Keeps the keys/values of the one forward it sees (the prefix pass). A checkpoint replay overwrites
    them with equal states instead of appending a second copy."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class _PrefixLayer(DynamicLayer):
    """One layer's prefix keys/values [1, heads, p, dim], read-only: update() returns them broadcast to the
    batch's rows and concatenated with the new states, and stores nothing. get_seq_length() is p, so the
    causal mask offsets the queries by p."""

    def __init__(self, keys, values):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        rows = key_states.shape[0]
        return (torch.cat([self.keys.expand(rows, -1, -1, -1), key_states], dim=-2),
                torch.cat([self.values.expand(rows, -1, -1, -1), value_states], dim=-2))


class SharedPrefixCache(Cache):
    """Past keys/values of the p virtual tokens, shared by every row and never written to; records which
    layers read it, so a forward that silently dropped it is caught."""

    def __init__(self, prefix):
        super().__init__(layers=[_PrefixLayer(k, v) for k, v in prefix])
        self.read_layers = set()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.read_layers.add(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)
