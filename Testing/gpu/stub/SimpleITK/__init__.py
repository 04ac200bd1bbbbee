"""Stand-in for SimpleITK where the real one cannot be installed (the GPU suite's machine: no package index, and its
52 MB wheel may not fit the transfer). Importing works, so the training package and the network run; any use raises.

``run_suite.sh`` puts this folder on ``PYTHONPATH`` only when ``import SimpleITK`` fails; the stages that read or
write images (the CLI end to end, its CUDA test) check ``SimpleITK.STUB`` and skip with the reason.
"""

STUB = True
REASON = "SimpleITK is not installed on this machine (the GPU suite's stand-in is in use)"


class _Missing:
    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"SimpleITK.{self._name}: {REASON}")

    def __getattr__(self, attribute: str) -> "_Missing":
        return _Missing(f"{self._name}.{attribute}")

    def __or__(self, other):  # type hints such as ``sitk.Image | None`` evaluated at run time
        return self

    __ror__ = __or__


def __getattr__(name: str) -> _Missing:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Missing(name)
