import pytest
import torch

from ci_core.models.backbone import load_backbone


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def random_backbone():
    """The tiny CLIP architecture with random weights: fast, for mechanics that need no trained model."""
    return load_backbone("ci-tiny-clip", "random:0")


@pytest.fixture(scope="session")
def tiny_backbone():
    """The shipped, trained tiny CLIP."""
    return load_backbone()
