import shutil

import pytest
import torch

from tensorwire.errors import FormatError
from tensorwire.integrations.safetensors import compress_path
from tensorwire.integrations.transformers import from_pretrained


def test_compressed_minilm_loads_with_identical_weights(tmp_path, minilm_path):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "minilm"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(minilm_path.parent / name, folder / name)
    packed = compress_path(folder)
    model = from_pretrained(packed)
    reference = transformers.AutoModel.from_pretrained(folder).eval()
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)


def test_folder_without_shards(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(FormatError, match="no .twz shards"):
        from_pretrained(tmp_path)
