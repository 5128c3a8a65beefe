"""Shared fixtures: tiny random PIPO checkpoints in the real HF layout, and their MLX conversions."""

import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch.*")

from hf_reference import RefPIPO, hf_config_dict, tiny_config, write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_pipo(tmp_path_factory):
    """(reference torch model, folder) for a merged PIPO checkpoint with an mlp compressor."""
    config = tiny_config()
    ref = RefPIPO(config, "mlp", seed=0)
    folder = tmp_path_factory.mktemp("hf") / "pipo-mlp"
    write_checkpoint(folder, ref.hf_state_dict(), hf_config_dict(config, compressor_type="mlp"))
    return ref, folder


@pytest.fixture(scope="session")
def mlx_pipo(hf_pipo, tmp_path_factory) -> Path:
    """The float32 MLX conversion of `hf_pipo`."""
    from pipo_mlx import convert

    return convert(str(hf_pipo[1]), str(tmp_path_factory.mktemp("mlx") / "pipo"), dtype="float32")
