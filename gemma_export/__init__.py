"""gemma-export: Gemma 3 to ExecuTorch, ONNX and TFLite/LiteRT, with parity proven per artifact.

The Python API (`gemma_export.api`, imported on first use so that `import gemma_export` stays light):

    import gemma_export as ge

    ge.export("gemma3-270m", "onnx", "build/onnx", recipe="int8")
    model = ge.open("build/onnx")
    print(model.generate("The capital of France is", max_new_tokens=16).text)
    ge.verify("build/onnx").raise_if_failed()
"""

API = ("load", "quantize", "export", "open", "verify", "evaluate", "bundle", "run_bundle", "check_outputs",
       "inspect", "read_config", "lint")


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'gemma_export' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *API])
