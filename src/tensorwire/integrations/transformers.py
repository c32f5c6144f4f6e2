"""Load a compressed model folder (config + ``*.twz`` shards) into a transformers model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..container import load_file
from ..errors import FormatError, require

__all__ = ["load_state_dict", "from_pretrained", "model_from_state"]


def load_state_dict(folder: str | os.PathLike[str], device: str = "cpu", **source: Any) -> dict[str, Any]:
    """All tensors of every ``*.twz`` shard in ``folder``, decoded to ``device``.

    ``source``: ``pacer`` (an emulated slow read path) for :class:`TwzFile`.
    """
    shards = sorted(Path(folder).glob("*.twz"))
    if not shards:
        raise FormatError(f"no .twz shards in {folder}; compress the model folder with `tensorwire compress` first")
    state: dict[str, Any] = {}
    for shard in shards:
        state.update(load_file(shard, device=device, **source))
    return state


def from_pretrained(folder: str | os.PathLike[str], auto_class: str = "AutoModel", device: str = "cpu",
                    pacer: Any = None, **config_kwargs: Any):  # fmt: skip
    """Build ``transformers.<auto_class>`` from ``folder``'s config and load its .twz weights.

    With ``device="cuda"`` the compressed chunks are decoded on the accelerator. The model
    is built without weights (accelerate's ``init_empty_weights``: parameters on the meta
    device, buffers real) and the decoded tensors *become* its parameters
    (``load_state_dict(assign=True)``): one copy of the weights in memory, never two, and
    no random initialisation. ``pacer`` paces the reads (see :class:`TwzFile`).

    Tied weights (e.g. ``lm_head`` sharing the embedding) may be absent from the shards, as
    in safetensors checkpoints; any other missing or unexpected key is an error.

    Examples
    --------
    >>> model = from_pretrained("SmolLM2-twz", "AutoModelForCausalLM")  # doctest: +SKIP
    """
    state = load_state_dict(folder, device=device, pacer=pacer)
    return model_from_state(folder, state, auto_class, **config_kwargs).to(device)


def model_from_state(folder: str | os.PathLike[str], state: dict[str, Any], auto_class: str = "AutoModel", **config_kwargs: Any):
    """``transformers.<auto_class>`` from ``folder``'s config, its parameters *being* ``state``'s tensors.

    See :func:`from_pretrained`; any state dict will do (e.g. ``safetensors.torch.load``'s).
    """
    transformers = require("transformers")
    config = transformers.AutoConfig.from_pretrained(folder, **config_kwargs)
    # Build the model in the checkpoint's float dtype, as transformers' own loader does.
    float_dtypes = [t.dtype for t in state.values() if t.is_floating_point()]
    dtype = max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else None
    accelerate = require("accelerate")
    with accelerate.init_empty_weights(include_buffers=False):
        model = getattr(transformers, auto_class).from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_empty = [name for name, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise FormatError(f"weights in {folder} leave {type(model).__name__} parameters unset: {still_empty[:5]}")
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    untied = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    # Checkpoints may carry buffers the model now rebuilds itself (e.g. BERT's position_ids),
    # which transformers' own loader skips as well.
    buffers = {name for name, _ in model.named_buffers()}
    unexpected = [k for k in unexpected if k not in buffers]
    if untied or unexpected:
        raise FormatError(
            f"weights in {folder} do not match {type(model).__name__}: missing {untied[:5]}, unexpected {list(unexpected)[:5]}"
        )
    return model.eval()
