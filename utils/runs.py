"""Run folders: one protocol for every stage.

A run folder holds `arguments.json` (every setting, `finished: false` until the run is done), the
checkpoints of an unfinished run, and in the end the model, adapter or classifier the stage wrote.
What happens to a folder that already holds a run is decided by its settings, never silently:

    finished, same settings      --resume: nothing to do        --overwrite: run again    else: error
    finished, other settings     --overwrite: replace                                      else: error naming the difference
    unfinished, same settings    --resume: continue from its last checkpoint   --overwrite: start again   else: error
    unfinished, other settings   --resume --overwrite: start again             else: error naming the difference

A later stage reads its parent's arguments.json (`inherit`): the data settings it left out are the parent's.
"""
import json
import os
import shutil
import sys
import time

from .cli import UserError, local_rank_zero, on_user_error
from .data import default_dataset, resolve_task

DONE = "arguments.json"  # written last-updated with "finished": true
CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE_FILE = "trainable.safetensors"  # a checkpoint's trainable weights (utils.training writes it)
# Flags that change where or how visibly a run goes, not what it computes: two runs that differ only
# here are the same run.
RUN_ONLY = {"output_path", "overwrite", "resume", "quiet", "report_to", "logging_steps", "save_steps",
            "save_total_limit", "keep_checkpoints", "eval_batch_size", "gradient_checkpointing", "shared_prefix"}


def settings_of(args, stage=None):
    """The settings that decide a run's result, as JSON values (tuples become lists)."""
    d = {k: v for k, v in (vars(args) if not isinstance(args, dict) else args).items() if k not in RUN_ONLY}
    if stage:
        d["stage"] = stage
        # with the per-device batch, the processes make the global batch and the steps per epoch
        d["world_size"] = world_size()
    return json.loads(json.dumps(d, default=str))


def world_size():
    """The processes of this launch (torchrun / accelerate launch set WORLD_SIZE; a plain launch is one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def global_batch(settings):
    """Rows per optimiser step: per-device batch × accumulation steps × processes (None for a stage that does not train)."""
    if "train_batch_size" not in settings:
        return None
    return (settings["train_batch_size"] * (settings.get("gradient_accumulation_steps") or 1)
            * settings.get("world_size", IMPLIED["world_size"]))


# settings added after runs were written: what those runs had
IMPLIED = {"task": "sentiment", "world_size": 1, "other_data": False}


def settings_diff(old, new):
    """['key: old → new', ...] for every setting of `new` that `old` records otherwise."""
    out = []
    for k in sorted(new):
        a = old.get(k, IMPLIED.get(k, "(absent)"))
        if a != new[k]:
            out.append(f"{k}: {a} → {new[k]}")
    return out


def _processes_first(diff, old, new):
    """A change of the number of processes changes the global batch: say so first, with both global batches."""
    for i, d in enumerate(diff):
        if d.startswith("world_size:"):
            a, b = old.get("world_size", IMPLIED["world_size"]), new.get("world_size")
            line = f"processes: {a} → {b}, so the global batch {global_batch(old)} → {global_batch(new)}"
            return [line] + diff[:i] + diff[i + 1:]
    return diff


def _summary(diff, n=4):
    return ", ".join(diff[:n]) + (f" and {len(diff) - n} more" if len(diff) > n else "")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def checkpoints(path):
    """The checkpoint folders of a run, oldest first."""
    if not os.path.isdir(path):
        return []
    found = [d for d in os.listdir(path) if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX):].isdigit()]
    return [os.path.join(path, d) for d in sorted(found, key=lambda d: int(d[len(CHECKPOINT_PREFIX):]))]


def is_complete(checkpoint):
    """Whether the Trainer finished writing `checkpoint`: it writes the weights, the optimiser, scheduler and RNG
    state, then trainer_state.json last; a crash in between leaves that file missing, cut short, or of another step."""
    state = read_json(os.path.join(checkpoint, "trainer_state.json"))
    step = int(os.path.basename(checkpoint)[len(CHECKPOINT_PREFIX):])
    return (isinstance(state, dict) and state.get("global_step") == step
            and os.path.isfile(os.path.join(checkpoint, TRAINABLE_FILE)))


def last_complete_checkpoint(path):
    """(the newest complete checkpoint or None, the incomplete ones newer than it)."""
    ckpts = checkpoints(path)
    skipped = []
    while ckpts and not is_complete(ckpts[-1]):
        skipped.insert(0, ckpts.pop())
    return (ckpts[-1] if ckpts else None), skipped


def resume_point(path):
    """The checkpoint --resume continues from, and one line on what it is (incomplete ones passed over by name)."""
    last, skipped = last_complete_checkpoint(path)
    line = f"resuming from {last}" if last else "no complete checkpoint: starting from the first step"
    if skipped:
        names = ", ".join(os.path.basename(c) for c in skipped)
        line += f" (passing over {names}: incomplete, a crash cut its writing short)"
    return last, line


def decide(path, settings, overwrite=False, resume=False):
    """What to do with `path` for a run of `settings`: ('new' | 'replace' | 'resume' | 'done', message).
    Raises UserError for every case the flags do not settle. Reads only: safe on every rank."""
    if os.path.isfile(path):
        raise UserError(f"--output_path {path} is a file, not a folder")
    old = read_json(os.path.join(path, DONE)) if os.path.isdir(path) else None
    if old is None:
        if os.path.isdir(path) and os.listdir(path):
            raise UserError(f"{path} holds files that no run of this toolkit wrote; choose another --output_path")
        return "new", None
    diff = _processes_first(settings_diff(old.get("settings", old), settings), old.get("settings", old), settings)
    if old.get("finished"):
        if not diff and resume:
            return "done", f"{path} holds a finished run with these settings: nothing to do (--overwrite runs it again)"
        if overwrite:
            return "replace", f"replacing the finished run in {path}" + (f" ({_summary(diff)})" if diff else "")
        if diff:
            raise UserError(f"{path} holds a finished run with other settings ({_summary(diff)}); pass --overwrite to "
                            f"replace it or choose another --output_path")
        raise UserError(f"{path} holds a finished run with these settings; pass --resume to keep it or --overwrite to run "
                        f"it again")
    ckpts = checkpoints(path)
    if not ckpts and not os.path.exists(os.path.join(path, "training_log.json")):
        # it stopped before its first step (a mistake found after the folder was made): nothing to lose
        return "replace", None
    last = last_complete_checkpoint(path)[0]
    where = f" (last checkpoint: {os.path.basename(last)})" if last else " (no complete checkpoint yet)"
    if resume and not diff:
        return "resume", f"resuming the unfinished run in {path}{where}"
    if overwrite:
        return "replace", f"starting the unfinished run in {path} again" + (f" ({_summary(diff)})" if diff else "")
    if diff:
        raise UserError(f"{path} holds an unfinished run with other settings ({_summary(diff)}); resume it with its own "
                        f"settings, or pass --overwrite to start again")
    raise UserError(f"{path} holds an unfinished run{where}; pass --resume to continue it or --overwrite to start again")


def _barrier():
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


# the fields of arguments.json that name a folder a run read, and what that folder was to it
_READS = (("model_checkpoints", "the model folder {who} starts from"), ("model_name", "the base model folder of {who}"),
          ("data_dir", "the data folder of {who}"))


def chain_folders(args):
    """[(absolute folder, what it is)]: the local folders a run reads (--model_checkpoints, --model_name, --data_dir)
    and, through their arguments.json, every folder its parents read, back to the base model and the data."""
    found, seen = [], set()
    todo = [(getattr(args, k, None), role.format(who="this run")) for k, role in _READS]
    while todo:
        folder, role = todo.pop(0)
        if not folder or not os.path.isdir(str(folder)) or os.path.realpath(folder) in seen:
            continue
        seen.add(os.path.realpath(folder))
        found.append((os.path.abspath(folder), role))
        info = read_json(os.path.join(folder, DONE)) or {}
        todo += [(info.get(k), role.format(who=folder)) for k, role in _READS]
    return found


def check_chain(path, args):
    """Refuse an --output_path that is, contains or lies inside a folder the run reads: --overwrite would delete
    the model it starts from, or its data. Checked before anything is touched."""
    out = os.path.realpath(path)
    for folder, role in chain_folders(args):
        real = os.path.realpath(folder)
        if out == real:
            relation = "is"
        elif real.startswith(out.rstrip(os.sep) + os.sep):
            relation = "contains"
        elif out.startswith(real.rstrip(os.sep) + os.sep):
            relation = "lies inside"
        else:
            continue
        what = role if relation == "is" else f"{folder}, {role}"
        raise UserError(f"--output_path {path} {relation} {what}: a run never writes where it reads; choose another "
                        f"--output_path")


def _disposable(path):
    """A folder of an unfinished run that stopped before its first step: nothing in it is worth keeping."""
    info = read_json(os.path.join(path, DONE)) or {}
    return (os.path.isdir(path) and not info.get("finished") and not checkpoints(path)
            and not os.path.exists(os.path.join(path, "training_log.json")))


def _remove_if_disposable(path):
    if local_rank_zero() and _disposable(path):
        shutil.rmtree(path, ignore_errors=True)


def prepare_run(path, args, stage):
    """Apply `decide` to --output_path: every process decides from the same folder state, then the first
    process alone deletes or creates. Returns 'new', 'resume' or 'done' (the caller stops). A folder it creates
    is removed again when the run is refused before its first step (utils.cli.run_main)."""
    check_chain(path, args)
    action, message = decide(path, settings_of(args, stage), args.overwrite, args.resume)
    if message and local_rank_zero():
        print(message, flush=True)
    _barrier()  # no process may read the folder after the first one has changed it
    if local_rank_zero():
        if action == "replace":
            shutil.rmtree(path)
        if action != "done":
            os.makedirs(path, exist_ok=True)
    if action in ("new", "replace"):
        on_user_error(lambda: _remove_if_disposable(path))
    _barrier()
    return "new" if action == "replace" else action


def save_arguments(path, args, finished=False, **extra):
    """Write arguments.json (only in the first process of a multi-process run)."""
    info = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    info["settings"] = settings_of(info, extra.get("stage"))  # what decides the result, before the derived fields
    if global_batch(info["settings"]) is not None:
        info["global_batch"] = global_batch(info["settings"])
    info.update(extra)
    info["finished"] = finished
    info["command"] = " ".join(sys.argv)
    info["saved_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if not local_rank_zero():
        return info
    save_json(os.path.join(path, DONE), info)
    return info


def save_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def short_name(model_name):
    return os.path.basename(os.path.normpath(str(model_name))).replace("/", "_")


def remove_checkpoints(path):
    """A finished run needs no checkpoints (the final model is saved beside them)."""
    for c in checkpoints(path):
        shutil.rmtree(c, ignore_errors=True)


# ---------------------------------------------------------------- a stage follows its parent

# Data settings a stage takes from the folder it starts from when they are not given
INHERITED = ("dataset", "task", "data_dir", "text_column", "label_column", "label_words", "max_length", "data_seed")
DEFAULTS = {"text_column": "text", "label_column": "label", "max_length": 1024, "data_seed": 42}
# the settings that describe the parent's rows: not taken when a stage reads other data (--other_data)
PARENT_ROWS = ("dataset", "data_dir", "text_column", "label_column", "data_seed", "max_forget", "max_retain")


def _other_data(args, parent, parent_name):
    """True when --data_dir names other data than the parent trained on: an error unless --other_data allows it."""
    mine, theirs = getattr(args, "data_dir", None), parent.get("data_dir")
    if mine is None or not parent:
        return False
    if theirs is not None and os.path.realpath(mine) == os.path.realpath(theirs):
        return False
    if theirs is None and (args.dataset or default_dataset(None, mine)) == parent.get("dataset"):
        return False  # a local copy of the hub dataset the parent trained on (a folder named sst2, or --dataset sst2)
    trained = f"the folder {theirs}" if theirs else f"the hub dataset {parent.get('dataset')}"
    if not getattr(args, "other_data", False):
        raise UserError(f"--data_dir {mine} is not the data {parent_name} was trained on ({trained}); leave --data_dir "
                        f"out to use that, or pass --other_data to use these rows anyway")
    print(f"warning: --other_data: the rows of {mine} are not ones {parent_name} trained on ({trained}); its row caps "
          f"are not applied", file=sys.stderr)
    return True


def inherit(args, parent, parent_name, quiet=False):
    """Fill the data flags left out (None) with the parent's (its arguments.json `parent`, {} for a pre-trained
    model), else the defaults; refuse contradictions that would unlearn rows the model never saw, and another
    data folder than the parent's unless --other_data says so. Says in one line what was taken and which data
    folder is read. Local paths are made absolute, so the run works from any working directory."""
    taken = []
    other = _other_data(args, parent, parent_name)
    for k in INHERITED:
        mine, theirs = getattr(args, k, None), parent.get(k)
        if theirs is None or (other and k in PARENT_ROWS):
            continue
        if mine is None:
            setattr(args, k, theirs)
            taken.append(f"{k}={theirs}")
        elif k in ("dataset", "task") and mine != theirs:
            raise UserError(f"{parent_name} was fine-tuned on --{k} {theirs}, not {mine}")
        elif k == "label_words" and [w.strip() for w in str(mine).split(",")] != [w.strip() for w in str(theirs).split(",")]:
            raise UserError(f"{parent_name} was fine-tuned with the label words {theirs}, not {mine}")
        elif k == "max_length" and mine > theirs:
            print(f"warning: --max_length {mine} is longer than {parent_name} was trained with ({theirs})", file=sys.stderr)
        elif k == "data_seed" and mine != theirs:
            print(f"warning: --data_seed {mine} differs from {parent_name}'s ({theirs}): capped rows are then not the "
                  f"rows it trained on", file=sys.stderr)
    for cap, split in (("max_forget", "forget"), ("max_retain", "retain")):
        theirs = parent.get(cap)
        if theirs is not None and hasattr(args, cap) and not other:
            if getattr(args, cap) is None:
                setattr(args, cap, theirs)
                taken.append(f"{cap}={theirs}")
            elif getattr(args, cap) > theirs:
                raise UserError(f"--{cap} {getattr(args, cap)} exceeds the {theirs} {split} rows {parent_name} was "
                                f"trained on: a stage may only use rows its parent trained on")
    for k, v in DEFAULTS.items():
        if getattr(args, k, "absent") is None:
            setattr(args, k, v)
    resolve_task(args)  # --task and --dataset, each from the other when neither the user nor the parent named it
    if args.data_dir:
        if not os.path.isdir(args.data_dir):
            where = f"that {parent_name} was trained on " if parent.get("data_dir") == args.data_dir else ""
            raise UserError(f"the data folder {args.data_dir} {where}does not exist" + (" (pass --data_dir)" if where else ""))
        args.data_dir = os.path.abspath(args.data_dir)
    if parent and not quiet:
        # the data folder always, given or taken: other data than the parent's must not pass unseen
        data = f"data_dir={args.data_dir}" if args.data_dir else f"the hub dataset {args.dataset}"
        data += " (not its data: --other_data)" if other else ""
        print(f"following {parent_name}: {', '.join([data] + [t for t in taken if not t.startswith('data_dir=')])}",
              flush=True)
    return args


def recorded_dataset(args, path):
    """--resume with --dataset left out, for a --data_dir whose run in `path` was written when a data folder was still
    called sst2: that name, so that the run resumes instead of differing in its dataset only."""
    old = read_json(os.path.join(path, DONE)) if path and getattr(args, "resume", False) else None
    if (args.dataset is None and args.data_dir and old and old.get("dataset") == "sst2" and old.get("data_dir")
            and os.path.realpath(old["data_dir"]) == os.path.realpath(args.data_dir)
            and "--dataset" not in str(old.get("command", ""))):
        args.dataset = "sst2"
    return args


def default_output(stage, args, model_name, tail=""):
    """runs/<stage>-<dataset>-<model>[-<tail>]: two datasets or models never share a folder."""
    name = "-".join(x for x in (stage, str(args.dataset), short_name(model_name), tail) if x)
    return os.path.join("runs", name)


def finish_run(path, what, next_commands=()):
    """A short README in the run folder (replacing PEFT's empty model card) and the next stage's command."""
    lines = [f"# {os.path.basename(os.path.normpath(path))}", "", what, "",
             "`arguments.json` holds every setting and the command that made this folder; `training_log.json` the loss "
             "and each loss term per logging step.", ""]
    if next_commands:
        lines += ["Next:", "", "```bash", *next_commands, "```", ""]
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("\n".join(lines))
    for c in next_commands:
        print(f"next: {c}")
