"""A fork server for running the real `lowbit` CLI thousands of times: one process imports lowbit, torch and
transformers once (running no torch op, so no thread pool exists to be broken by fork), then forks a child per
case. The child is a subprocess like any other: its own process group, stdin from /dev/null, stdout and
stderr to files, rlimits (address space = the server's + the memory cap, no core files, bounded file
sizes), one torch thread; it runs `lowbit.cli.main()` with the case's argv and exits with its code. The
server kills a child's group at its timeout and reports its exit status or signal and peak RSS (wait4).

Protocol (JSON lines): requests on the server's stdin
    {"id", "argv", "cwd", "env", "timeout", "mem_cap", "stdout", "stderr"}
and replies on its stdout
    {"id", "code", "signal", "timed_out", "peak_rss", "seconds"}
Run: python -m tests.fuzz.forkserver --jobs 2 (ForkServer below starts and drives it).
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SERVER_ENV = {
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error", "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg",
}


def _preload() -> None:
    """Everything the CLI imports on its paths, imported once here (no torch op runs)."""
    import importlib

    for name in [
        "numpy", "torch", "torch.nn.functional", "safetensors", "safetensors.torch", "gguf", "gguf.quants",
        "tokenizers", "typer", "click", "tqdm", "tqdm.auto", "accelerate",
        "transformers", "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
        "transformers.models.auto.configuration_auto", "transformers.models.llama.modeling_llama",
        "transformers.models.llama.configuration_llama", "transformers.tokenization_utils_fast",
        "transformers.modeling_gguf_pytorch_utils", "transformers.integrations.ggml",
        "transformers.generation", "transformers.generation.utils",
        "matplotlib", "matplotlib.pyplot", "matplotlib.backends.backend_agg", "PIL.PngImagePlugin", "pydantic",
        "numpy.ctypeslib", "transformers.generation.streamers", "transformers.integrations.gguf.gguf_config_mapping",
        "typer._adapters", "typer._click.decorators",
        "lowbit", "lowbit.cli", "lowbit.api", "lowbit.inspect", "lowbit.generation",
        "lowbit.formats.checkpoint", "lowbit.core.io", "lowbit.core.inputs", "lowbit.formats.safetensors_read",
        "lowbit.formats.gguf.check", "lowbit.formats.gguf.export", "lowbit.formats.gguf.reader",
        "lowbit.formats.gguf.blocks", "lowbit.formats.gguf.mixtures",
        "lowbit.models.loading", "lowbit.models.lazy", "lowbit.models.lean", "lowbit.models.arch",
        "lowbit.eval.perplexity", "lowbit.eval.size", "lowbit.eval.outliers",
        "lowbit.calibration.data", "lowbit.calibration.stats", "lowbit.calibration.sequential",
        "lowbit.algorithms.rtn", "lowbit.algorithms.gptq", "lowbit.algorithms.awq", "lowbit.algorithms.smoothquant",
        "lowbit.algorithms.llm_int8", "lowbit.nn.qlinear", "lowbit.nn.int8", "lowbit.nn.decoder",
        "lowbit.kernels.native", "lowbit.kernels.int4", "lowbit.kernels.int8", "lowbit.kernels.w8",
    ]:
        try:
            importlib.import_module(name)
        except Exception:  # a module another branch moved or removed: the child imports what it needs
            pass
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401 (lazy attributes)
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401


def _vm_size() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _child(req: dict, proto_fd: int) -> None:
    """In the forked child: never returns."""
    code = 1
    try:
        os.setpgid(0, 0)
        os.close(proto_fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in (null, out, err):
            os.close(fd)
        import resource

        cap = _vm_size() + int(req["mem_cap"])
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        fsize = int(req.get("max_file", 4 << 30))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        os.environ.update(req.get("env", {}))
        os.chdir(req["cwd"])
        import torch

        torch.set_num_threads(1)
        sys.argv = ["lowbit", *req["argv"]]
        from lowbit.cli import main

        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    except BaseException:  # an exception escaping main: its traceback is the finding
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code & 0xFF)


def serve(jobs: int) -> None:
    proto = os.dup(1)  # replies go here; stray prints of the server go to stderr
    os.dup2(2, 1)
    _preload()
    os.write(proto, (json.dumps({"ready": True, "pid": os.getpid()}) + "\n").encode())
    pending: list[dict] = []
    running: dict[int, tuple[dict, int, float]] = {}  # pidfd -> (request, pid, start)
    buf = b""
    eof = False
    while not (eof and not pending and not running):
        while pending and len(running) < jobs:
            req = pending.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(req, proto)
            try:
                os.setpgid(pid, pid)
            except OSError:
                pass
            running[os.pidfd_open(pid)] = (req, pid, time.monotonic())
        now = time.monotonic()
        wait = min([start + float(req["timeout"]) - now for req, _, start in running.values()], default=None)
        fds = list(running) + ([] if eof else [0])
        ready, _, _ = select.select(fds, [], [], None if wait is None else max(wait, 0.0))
        if 0 in ready:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                eof = True
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.strip():
                    pending.append(json.loads(line))
        now = time.monotonic()
        for fd in list(running):
            req, pid, start = running[fd]
            timed_out = fd not in ready and now >= start + float(req["timeout"])
            if fd not in ready and not timed_out:
                continue
            if timed_out:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            _, status, ru = os.wait4(pid, 0)
            try:  # what the child's group left running (a compiler, a helper) goes too
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            os.close(fd)
            del running[fd]
            reply = {"id": req["id"], "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                     "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, "timed_out": timed_out,
                     "peak_rss": ru.ru_maxrss * 1024, "seconds": round(time.monotonic() - start, 3)}
            os.write(proto, (json.dumps(reply) + "\n").encode())


class ForkServer:
    """The client: starts the server (python -m tests.fuzz.forkserver) and runs requests through it."""

    def __init__(self, jobs: int = 2, log: str | os.PathLike | None = None):
        env = {**os.environ, **SERVER_ENV,
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self._log = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.forkserver", "--jobs", str(jobs)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, cwd=ROOT,
                                     env=env)
        hello = self.proc.stdout.readline()
        if not hello:
            raise RuntimeError("fork server did not start")
        self.pid = json.loads(hello)["pid"]
        self._n = 0

    def run_many(self, requests: list[dict]):
        """Submit every request; yield the replies as the children finish (any order)."""
        ids = set()
        for r in requests:
            self._n += 1
            r = {**r, "id": r.get("id", self._n)}
            ids.add(r["id"])
            self.proc.stdin.write((json.dumps(r) + "\n").encode())
        self.proc.stdin.flush()
        while ids:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("fork server died")
            reply = json.loads(line)
            ids.discard(reply["id"])
            yield reply

    def run(self, request: dict) -> dict:
        return next(iter(self.run_many([request])))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    serve(ap.parse_args().jobs)
