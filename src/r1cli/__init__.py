"""r1cli: run DeepSeek-R1 and its distilled models with a compact pure-PyTorch runtime.

`load(name)`: the model and its tokenizer (forward passes, docs/python-api.md). `open_model(ModelOptions(name))`:
the model as the command line opens it, whose `chat(messages, system, sampling)` streams a reply as events
(events.py: Start, ReasoningDelta, AnswerDelta, Done; `stop()` ends it)."""

__version__ = "0.1.0"

__all__ = ["load", "open_model", "ModelOptions", "__version__"]


def __getattr__(name):
    # Lazy so that `r1 --help` does not pay for importing torch.
    if name == "load":
        from .loader import load

        return load
    if name == "open_model":
        from .engine import open_model

        return open_model
    if name == "ModelOptions":
        from .options import ModelOptions

        return ModelOptions
    raise AttributeError(name)
