"""Load whatever a pipeline stage wrote, following the `arguments.json` chain back to the base model.

    pre-trained model (hub id, model folder, smollm2-135m)  -> TailLM(lm)                method "vanilla"
    qlora.py folder                                         -> TailLM(base + merged LoRA) "qlora" / "retrained"
    spul.py folder      -> merged qlora model + the P-tuning adapter, as SoftPromptLM   "spul"
    baselines.py folder -> the saved unlearned model, or (lora: true) the merged qlora model + its LoRA adapter
    eco.py folder       -> utils.eco.load_eco_model                                      "eco"
    prompting.py folder -> utils.prompting.load_prompting_model         "icul", "guardrail", "filter", "filter_classifier"

Loading flows one way: this module loads models; method modules (utils/eco.py, utils/prompting.py) wrap the model
they are handed and never import this one.

Every returned model has the `model(input_ids, attention_mask, keep=K)` interface of utils.training.TailLM.
A broken chain (missing folder, unfinished run, adapter of another base model) is a one-line UserError.
"""
import os
import re
from typing import NamedTuple

import torch
from torch import nn

from .cli import UserError, comma_list
from .modeling import EMBEDDED, EMBEDDED_ALIASES, check_adapter_base, load_merged_model, load_model, load_tokenizer, read_arguments
from .runs import CHECKPOINT_PREFIX, read_json


class Stage(NamedTuple):
    model: nn.Module  # model(input_ids, attention_mask, keep=K) -> logits of the last K positions
    tokenizer: object
    info: dict  # method, model (base model name), stage, checkpoint, arguments, encoder_kwargs


def looks_like_path(name):
    """A name that can only mean a local folder (a hub id is 'owner/name' with no leading ./ or /)."""
    name = str(name)
    first = name.replace("\\", "/").split("/")[0]
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or ("/" in name and os.path.isdir(first)))


def refuse_intermediate(name):
    """A checkpoint-N folder inside a run folder is a training state the Trainer saved, not a stage: no
    arguments.json of its own, so without this it would be taken for a hub name or a bare model. Known by its name
    and by what it holds (utils.training.TRAINABLE_FILE) or the run folder around it."""
    name = str(name)
    folder, base = os.path.split(os.path.normpath(name))
    if not (os.path.isdir(name) and re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"\d+", base)):
        return
    if not any(os.path.exists(f) for f in (os.path.join(name, "trainable.safetensors"), os.path.join(folder, "arguments.json"))):
        return
    run = folder or "."
    done = (read_json(os.path.join(run, "arguments.json")) or {}).get("finished")
    how = (f"use the finished run {run}" if done else
           f"finish the run in {run} first (its own command with --resume), then use {run}")
    raise UserError(f"{name} is an intermediate checkpoint of a run, not a stage: {how}")


def _read_finished(folder, expected=None):
    info = read_arguments(folder)  # UserError when the folder or its arguments.json is missing
    if expected and info.get("stage") not in expected:
        raise UserError(f"{folder} was written by {info.get('stage') or 'an unknown stage'}, "
                        f"expected a {' or '.join(expected)} folder")
    if not info.get("finished", False):
        raise UserError(f"the run in {folder} did not finish (arguments.json has finished: false); re-run its stage")
    return info


def _parent(folder, info):
    """The model a spul/baseline/eco folder started from (its `model_checkpoints`): a finished qlora.py folder
    (path returned, its arguments checked) or a pre-trained model (name returned, arguments None)."""
    parent = info.get("model_checkpoints")
    if not parent:
        raise UserError(f"{folder}/arguments.json does not name the model it started from (model_checkpoints)")
    if not os.path.isdir(parent) and not os.path.isabs(parent):
        # a relative path written from another working directory: try it beside the stage folder
        beside = os.path.join(os.path.dirname(os.path.normpath(folder)), os.path.basename(os.path.normpath(parent)))
        parent = beside if os.path.isdir(beside) else parent
    if os.path.isdir(parent) and os.path.exists(os.path.join(parent, "arguments.json")):
        return parent, _read_finished(parent, ("qlora",))
    embedded = EMBEDDED_ALIASES.get(parent.lower(), parent.lower()) in EMBEDDED
    if not os.path.isdir(parent) and not embedded and looks_like_path(parent):
        raise UserError(f"the folder {parent} that {folder} was trained from does not exist")
    return parent, None


def _tokenizer(folders, set_pad_id=False):
    """The tokenizer saved in the first of `folders` that has one (stages save it beside their adapter)."""
    for f in folders:
        if f and os.path.isdir(f) and os.path.exists(os.path.join(f, "tokenizer_config.json")):
            return load_tokenizer(f, set_pad_id)
    return load_tokenizer(folders[-1], set_pad_id)


def _with_adapter(lm, folder, base_name, what):
    from peft import PeftModel

    check_adapter_base(folder, base_name)
    try:
        return PeftModel.from_pretrained(lm, folder)
    except (RuntimeError, ValueError, KeyError) as e:  # shape or key mismatch: another architecture
        raise UserError(f"the {what} adapter in {folder} does not fit {base_name}: {str(e).splitlines()[0][:200]}")


def start_point(name, stage):
    """The arguments.json of the model an unlearning stage (spul, baselines, eco) starts from: a finished qlora.py
    folder, or {} for a pre-trained model (hub id, model folder, embedded name). Checked before any data or
    model is loaded: a missing folder is reported as such, not as a failed hub download."""
    name = str(name)
    refuse_intermediate(name)
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "arguments.json")):
        info = read_arguments(name)
        if info.get("stage") != "qlora":
            raise UserError(f"{name} was written by {info.get('stage')}: {stage} starts from a qlora.py folder or a "
                            f"pre-trained model")
        return _read_finished(name, ("qlora",))
    if os.path.isdir(name):
        if os.path.exists(os.path.join(name, "adapter_config.json")):
            raise UserError(f"{name} holds an adapter but no arguments.json: cannot tell which model it belongs to")
        return {}
    if EMBEDDED_ALIASES.get(name.lower(), name.lower()) in EMBEDDED:
        return {}
    if looks_like_path(name):
        raise UserError(f"--model_checkpoints {name} does not exist")
    try:
        load_tokenizer(name)
    except UserError as e:
        raise UserError(f"--model_checkpoints {name} is no folder, and no hub model of that name could be loaded "
                        f"({str(e).split(': ', 1)[-1][:160]})")
    return {}


def follow(args, stage):
    """The start of every unlearning stage: check the model it starts from (`start_point`), make a local folder's
    path absolute, and take the data settings it left out from that folder (utils.runs.inherit). Returns the
    parent's arguments.json ({} for a pre-trained model)."""
    from .runs import inherit

    parent = start_point(args.model_checkpoints, stage)
    if os.path.isdir(args.model_checkpoints):
        args.model_checkpoints = os.path.abspath(args.model_checkpoints)
    inherit(args, parent, args.model_checkpoints)
    return parent


def load_start_model(name, dtype=torch.float32, device=None):
    """The model an unlearning stage starts from: the qlora.py model with its adapter merged, or a pre-trained
    model. Returns (model, base model name)."""
    if os.path.isdir(str(name)) and os.path.exists(os.path.join(str(name), "arguments.json")):
        lm, info = load_merged_model(name, dtype=dtype, device=device)
        return lm, info["model_name"]
    return load_model(name, dtype=dtype, device=device), str(name)


def load_stage(path_or_name, dtype=torch.float32, set_pad_id=False, shared_prefix=True):
    """Load the model a stage wrote (or a pre-trained model). Returns Stage(model, tokenizer, info).
    `set_pad_id` forces pad = EOS (also taken from the stage's arguments.json); `shared_prefix` picks the
    soft-prompt forward of a spul folder (utils/soft_prompt.py: the same numbers either way)."""
    from .training import TailLM

    name = str(path_or_name)
    refuse_intermediate(name)
    embedded = EMBEDDED_ALIASES.get(name.lower(), name.lower()) in EMBEDDED
    if not embedded and not os.path.isdir(name) and looks_like_path(name):
        raise UserError(f"checkpoint folder {name} does not exist")

    # a pre-trained model: hub id, embedded name, or a model folder that no stage of ours wrote
    if embedded or not os.path.isdir(name) or not os.path.exists(os.path.join(name, "arguments.json")):
        if os.path.isdir(name) and os.path.exists(os.path.join(name, "adapter_config.json")):
            raise UserError(f"{name} holds an adapter but no arguments.json: cannot tell which model it belongs to")
        try:
            tok = load_tokenizer(name, set_pad_id)
        except UserError as e:
            if embedded or os.path.isdir(name):
                raise
            raise UserError(f"checkpoint folder {name} does not exist, and no hub model of that name could be loaded "
                            f"({str(e).split(': ', 1)[-1][:160]})")
        lm = load_model(name, dtype=dtype)
        info = {"method": "vanilla", "stage": "pretrained", "model": name, "checkpoint": None, "arguments": {}}
        return Stage(TailLM(lm), tok, _finish(info))

    info = _read_finished(name)
    stage = info.get("stage")
    set_pad = set_pad_id or bool(info.get("set_pad_id", False))
    if stage == "qlora":
        lm, _ = load_merged_model(name, dtype=dtype)
        method = "retrained" if info.get("train_on") == "retain" else "qlora"
        out = {"method": method, "model": info["model_name"]}
        return Stage(TailLM(lm), _tokenizer([name, info["model_name"]], set_pad), _finish(out, stage, name, info))

    if stage == "spul":
        from .soft_prompt import SoftPromptLM

        parent, pinfo = _parent(name, info)
        lm, base = load_start_model(parent, dtype)
        peft_model = _with_adapter(lm, name, base, "prompt")
        peft_model.eval()
        model = SoftPromptLM(peft_model, shared_prefix)
        out = {"method": "spul", "model": base, "parent": parent,
               "encoder_kwargs": {"generic_labels": _generic(info)}}
        return Stage(model, _tokenizer([name, parent, base], set_pad), _finish(out, stage, name, info))

    if stage == "baseline":
        parent, pinfo = _parent(name, info)
        base = pinfo["model_name"] if pinfo else parent
        if info.get("lora"):
            lm = _with_adapter(load_start_model(parent, dtype)[0], name, base, "LoRA").merge_and_unload()
        else:
            if not os.path.exists(os.path.join(name, "config.json")):
                raise UserError(f"{name} has no saved model (config.json missing): the run did not finish")
            lm = load_model(name, dtype=dtype)
        method = info.get("unlearn_method") or info.get("method")
        if not method:
            raise UserError(f"{name}/arguments.json does not say which unlearning method it ran (unlearn_method)")
        out = {"method": method, "model": base, "parent": parent,
               "encoder_kwargs": {"generic_labels": _generic(info)}}
        return Stage(TailLM(lm), _tokenizer([name, parent, base], set_pad), _finish(out, stage, name, info))

    if stage == "eco":
        from .eco import load_eco_model  # written by the ECO stage; imported only when needed

        parent, pinfo = _parent(name, info)
        base = pinfo["model_name"] if pinfo else parent
        model, eco_info = load_eco_model(name, load_start_model(parent, dtype)[0])
        out = {"method": "eco", "model": base, "parent": parent, "eco": eco_info}
        return Stage(model, _tokenizer([name, parent, base], set_pad), _finish(out, stage, name, info))

    if stage == "prompting":
        from .prompting import load_prompting_model

        parent, pinfo = _parent(name, info)
        base = pinfo["model_name"] if pinfo else parent
        tok = _tokenizer([name, parent, base], set_pad)
        model, cfg = load_prompting_model(name, load_start_model(parent, dtype)[0], tok)
        out = {"method": cfg["name"], "model": base, "parent": parent, "prompting": cfg,
               "encoder_kwargs": {"generic_labels": _generic(info)}}
        return Stage(model, tok, _finish(out, stage, name, info))

    raise UserError(f"{name} was written by an unknown stage '{stage}' (expected qlora, spul, baseline, eco or "
                    f"prompting)")


def _generic(info):
    return comma_list(info.get("generic_labels") or "") or None


def _finish(out, stage="pretrained", folder=None, arguments=None):
    out.setdefault("stage", stage)
    out.setdefault("checkpoint", folder)
    out.setdefault("arguments", arguments or {})
    out.setdefault("encoder_kwargs", {})
    out["encoder_kwargs"] = {k: v for k, v in out["encoder_kwargs"].items() if v}
    return out


def stage_arguments(path_or_name):
    """The arguments.json of a stage folder ({} for a pre-trained model): read before any model is loaded,
    so that the data settings the stage used are known early."""
    name = str(path_or_name)
    refuse_intermediate(name)
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "arguments.json")):
        return _read_finished(name)
    if not os.path.isdir(name) and looks_like_path(name) and EMBEDDED_ALIASES.get(name.lower(), name.lower()) not in EMBEDDED:
        raise UserError(f"checkpoint folder {name} does not exist")
    return {}
