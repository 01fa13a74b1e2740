"""r1cli: run DeepSeek-R1 and its distilled models with a compact pure-PyTorch runtime."""

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def __getattr__(name):
    # Lazy so that `r1 --help` does not pay for importing torch.
    if name == "load":
        from .loader import load

        return load
    raise AttributeError(name)
