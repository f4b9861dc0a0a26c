"""Third-party messages that tell a gemma-export user nothing, silenced at their source before
those packages load (the CLI calls `silence()` first; library users keep their own logging).

- TensorFlow Lite's converter logs INFO lines from C++ (op counts; a oneDNN notice, which
  turning oneDNN off silences: the converted bytes are the same either way, checked).
- torchao warns that its CUDA kernels do not load on a CPU build.
- torch warns about an enum registration torchao makes, and litert-torch's pickling of tree specs
  triggers torch's LeafSpec deprecation notice.
- torch.onnx lists the torchvision ops it skips (torchvision is not a dependency) and says it will
  not rename dynamic axes (we name every input and output ourselves).
- ExecuTorch warns that a mutated buffer's initial value is not kept unless a pass keeps it: the
  KV cache is kept initialised by exactly that pass (backends/executorch.py).
"""

from __future__ import annotations

import logging
import os
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
