"""Loaded by every Python process `tensorwire diagnose run` starts (it is first on PYTHONPATH).

In a rank of a torch.distributed job (RANK is set), it installs the probe right after
``import torch`` completes, and the fault ``TENSORWIRE_FAULT`` names if any (the tests and the
benchmark set it; the fault's parts go beneath and above the probe, see faults.py); other
processes (the launcher, torchrun's agent) are left alone.
Then it runs the sitecustomize this one shadows, if there is one.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            from tensorwire.diagnose.faults import install_from_env

            install_from_env("below" if probing else "all")  # a bad fault is the test's error: raise
            if probing:
                try:
                    from tensorwire.diagnose.probe import install

                    install()
                except Exception as exc:  # noqa: BLE001 - the probe must never stop the job
                    print(f"tensorwire diagnose: the probe could not be installed: {exc!r}", file=sys.stderr)
                install_from_env("above")

        spec.loader.exec_module = exec_then_install
        return spec


probing = bool(os.environ.get("TENSORWIRE_DIAGNOSE_ADDR"))
if os.environ.get("RANK") is not None and (probing or os.environ.get("TENSORWIRE_FAULT")):
    sys.meta_path.insert(0, _AfterTorchImport())


def _chain():
    """Run the sitecustomize module further down sys.path, which this one hides."""
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == _HERE:
            continue
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [entry])
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return


_chain()
