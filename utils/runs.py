"""Run folders: overwrite protection, arguments.json next to every checkpoint, training logs."""
import json
import os
import shutil
import sys
import time

from .cli import UserError, local_rank_zero

DONE = "arguments.json"  # written last-updated with "finished": true


def prepare_output_dir(path, overwrite=False):
    """Create `path`; refuse to touch a finished run unless --overwrite.

    In a multi-process run (torchrun) only the first process checks, deletes and creates: the
    others write nothing, so they cannot race it."""
    if not local_rank_zero():
        return path
    args_file = os.path.join(path, DONE)
    if os.path.exists(args_file):
        with open(args_file) as f:
            finished = json.load(f).get("finished", False)
        if finished and not overwrite:
            raise UserError(f"{path} holds a finished run; pass --overwrite to replace it or choose another --output_path")
        if overwrite:
            shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    return path


def save_arguments(path, args, finished=False, **extra):
    """Write arguments.json (only in the first process of a multi-process run)."""
    info = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    info.update(extra)
    info["finished"] = finished
    info["command"] = " ".join(sys.argv)
    info["saved_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if not local_rank_zero():
        return info
    with open(os.path.join(path, DONE), "w") as f:
        json.dump(info, f, indent=2, default=str)
    return info


def save_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def is_finished(path):
    try:
        with open(os.path.join(path, DONE)) as f:
            return json.load(f).get("finished", False)
    except (OSError, ValueError):
        return False


def short_name(model_name):
    return os.path.basename(os.path.normpath(str(model_name))).replace("/", "_")
