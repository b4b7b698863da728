"""Shared fixtures: tiny random models built from a config (fast), the real SST-2 split, and a helper
that runs the pipeline scripts as a user would. Nothing here touches the Hugging Face hub."""
import os
import subprocess
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two test processes on a two-core machine (pytest-xdist): one thread each, for them and for
# the scripts they start, or tiny models slow down several times over oversubscribed cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# pytest's widest fixture scope: each such fixture is built once per test run (once per test process under -n),
# not once per test
ONCE_PER_RUN = "session"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.data import default_data_dir  # noqa: E402

# Modules whose tests run whole pipelines (minutes each) go first, so that under `pytest -n 2` the short tests
# fill the gaps at the end instead of one worker finishing a long test alone.
LONG_FIRST = ("test_scripts.py", "test_select.py", "test_paper_scale.py", "test_multiprocess.py", "test_first_use.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: file order kept within a module


@pytest.fixture(scope=ONCE_PER_RUN)
def sst2_dir():
    d = default_data_dir()
    assert d is not None, "../shared/data/sst2 is missing beside the checkout"
    return d


@pytest.fixture(scope=ONCE_PER_RUN)
def smol_path():
    """The embedded SmolLM2-135M-Instruct, converted once to safetensors."""
    from utils.modeling import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope=ONCE_PER_RUN)
def tokenizer(smol_path):
    from utils.modeling import load_tokenizer

    return load_tokenizer(smol_path)


def _save_tiny(path, model_type, tokenizer, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if model_type == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **ids)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=512, word_embed_proj_dim=64, **ids)
        model = OPTForCausalLM(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope=ONCE_PER_RUN)
def tiny_llama(tmp_path_factory, tokenizer):
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer, saved to a folder."""
    return _save_tiny(tmp_path_factory.mktemp("tiny_llama"), "llama", tokenizer)


@pytest.fixture(scope=ONCE_PER_RUN)
def tiny_opt(tmp_path_factory, tokenizer):
    return _save_tiny(tmp_path_factory.mktemp("tiny_opt"), "opt", tokenizer)


def write_split_dir(path, splits):
    """Write {split: [(text, label), ...]} as CSV files in `path`."""
    import csv

    os.makedirs(path, exist_ok=True)
    for split, rows in splits.items():
        with open(os.path.join(path, f"{split}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label", "label_text"])
            for text, label in rows:
                w.writerow([text, label, ["negative", "positive"][label]])
    return str(path)


_SERVER = []  # this test process's fork server (tests/forkserver.py), started on first use


def _fork_server():
    if not _SERVER or _SERVER[0].poll() is not None:
        _SERVER[:] = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "forkserver.py")], cwd=ROOT,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                       env={**os.environ, "HF_HUB_OFFLINE": "1"})]
    return _SERVER[0]


def _read_reply(server, timeout=None):
    import json
    import select

    line = b""
    while not line.endswith(b"\n"):
        if timeout is not None and not select.select([server.stdout], [], [], timeout)[0]:
            return None
        chunk = os.read(server.stdout.fileno(), 1)
        if not chunk:
            raise RuntimeError("the tests' fork server ended")
        line += chunk
    return json.loads(line)


def _forked(cmd, env, timeout):
    """`cmd` run as subprocess.run would, in a process forked from the fork server (no ~10 s library import)."""
    import json
    import signal
    import tempfile

    server = _fork_server()
    with tempfile.TemporaryDirectory() as d:
        out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        server.stdin.write((json.dumps({"argv": cmd[1:], "cwd": ROOT, "env": env, "stdout": out, "stderr": err}) + "\n").encode())
        pid = _read_reply(server)["pid"]
        done = _read_reply(server, timeout)
        if done is None:
            os.killpg(pid, signal.SIGKILL)
            _read_reply(server)
            raise subprocess.TimeoutExpired(cmd, timeout)
        with open(out, errors="replace") as f, open(err, errors="replace") as g:
            return subprocess.CompletedProcess(cmd, done["status"], f.read(), g.read())


def run_here(module, *args):
    """A script's main() in this process, as its command line would run it (no interpreter start-up per stage)."""
    saved = sys.argv
    sys.argv = [module.__file__, *map(str, args)]
    try:
        module.main()
    finally:
        sys.argv = saved


def run_script(script, *args, check=True, timeout=900, env=None):
    """Run a top-level script as a user would; return the CompletedProcess (stdout+stderr captured). The script
    runs in a fresh process forked from one that has imported the heavy libraries (tests/forkserver.py);
    SPUL_TEST_FORK=0 starts a new interpreter instead."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    if os.environ.get("SPUL_TEST_FORK", "1") == "0":
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    else:
        proc = _forked(cmd, env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope=ONCE_PER_RUN)
def tiny_qlora(tmp_path_factory, tiny_llama, sst2_dir):
    """A finished qlora.py folder on the tiny Llama (full precision, a few steps): input to later stages."""
    out = tmp_path_factory.mktemp("runs") / "qlora"
    run_script("qlora.py", "--model_name", tiny_llama, "--data_dir", sst2_dir, "--max_retain", 48, "--max_forget", 16,
               "--num_epochs", 1, "--train_batch_size", 16, "--max_length", 64, "--quantization", "none",
               "--output_path", out, "--quiet")
    return str(out)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, here and in the scripts a test module starts: on a busy
    two-core machine two threads made a tiny training run ten times slower. Use it per module with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    env, threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


def one_line_error(proc):
    """A user mistake: exit status 2, no traceback, exactly one `error:` line (returned)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]
