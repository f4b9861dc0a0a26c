"""Third-party messages that tell a gemma-export user nothing, silenced at their source before
those packages load (the CLI calls `silence()` first; library users keep their own logging).

- TensorFlow Lite's converter logs INFO lines from C++ (op counts; a oneDNN notice, which
  turning oneDNN off silences: the converted bytes are the same either way, checked).
- torchao warns that its CUDA kernels do not load on a CPU build.
- torch warns about an enum registration torchao makes, and litert-torch's pickling of tree specs
  triggers torch's LeafSpec deprecation notice.
- torch.onnx lists the torchvision ops it skips (torchvision is not a dependency) and says it will
  not rename dynamic axes (we name every input and output ourselves).
- The QNN HTP library prints a notice to stdout as it loads (see native_stdout).
- ExecuTorch's cache kernels call torch's deprecated `_check_is_size` while tracing, and torch
  warns about it at every cache write (dozens of lines per pte export).
- ExecuTorch warns that a mutated buffer's initial value is not kept unless a pass keeps it: the
  KV cache is kept initialised by exactly that pass (backends/executorch.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings


def silence() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"# ONNX model has different number of inputs than the flatten")
    warnings.filterwarnings("ignore", message=r"Mutation on a buffer in the model is detected")
    warnings.filterwarnings("ignore", message=r"_check_is_size will be removed", category=FutureWarning)


@contextlib.contextmanager
def native_info_lines(keep=("ERROR", "FATAL", "E0", "F0")):
    """Hold back what native code prints to the stderr file descriptor inside the block (LiteRT's
    INFO lines about accelerators it registers, ExecuTorch's cpuinfo probing), passing on the lines
    that report an error. Neither runtime has a switch for its log level in its Python API."""
    routed = io.StringIO()  # ExecuTorch's bindings route its log to Python's sys.stderr instead
    with _held(2, keep, routed), contextlib.redirect_stderr(routed):
        yield


@contextlib.contextmanager
def native_stdout(keep=("ERROR", "FATAL")):
    """The same for the stdout file descriptor, where `--json` output goes: the QNN HTP library
    prints a notice about its thread-local configuration there as it loads."""
    with _held(1, keep):
        yield


@contextlib.contextmanager
def _held(fd: int, keep, routed: io.StringIO | None = None):
    (sys.stdout if fd == 1 else sys.stderr).flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines()
            for line in [*lines, *(routed.getvalue().splitlines() if routed else ())]:
                if line.lstrip().startswith(keep):
                    print(line, file=sys.stderr)


def at_exit() -> None:
    """The command has said everything it will: what runtimes print while the interpreter tears
    them down (LiteRT lists each accelerator it destroys) goes nowhere."""
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
