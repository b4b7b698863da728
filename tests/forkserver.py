"""Runs the toolkit's scripts for the tests, each in a fresh process forked from this one, which has imported the
heavy libraries once (torch, transformers, peft, bitsandbytes, scikit-learn: ~10 s of every script's start on the
test machine's cores, most of a tiny stage's run).

A forked child is the script run as `python SCRIPT ARGS` would run it: its own process, working directory,
environment, argv, sys.path[0] (the script's folder), stdout and stderr (files), exit status (SystemExit's code; 1
and a traceback for an uncaught exception). This process only imports: it never computes, so no thread pool
exists yet when it forks. Requests are JSON lines on stdin; for each, a line {"pid": ...} when the child started
and a line {"status": ...} (as subprocess's returncode) when it ended.
"""
import json
import os
import runpy
import sys
import traceback


def preload():
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer  # noqa: F401


def run(req):
    """The child: never returns."""
    code = 1
    try:
        os.setpgrp()  # the test side can stop the script and whatever it started
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        if req["env"].get("OMP_NUM_THREADS"):
            import torch

            torch.set_num_threads(int(req["env"]["OMP_NUM_THREADS"]))
        script = req["argv"][0]
        sys.argv = list(req["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
        os._exit(code)


def reply(obj):
    os.write(1, (json.dumps(obj) + "\n").encode())


def main():
    preload()
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run(req)
        reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        reply({"status": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    main()
