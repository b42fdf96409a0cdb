"Shared pytest fixtures."
import pytest
import torch


def random_video(batch: int, frames: int = 17, size: int = 64, seed: int = 0) -> torch.Tensor:
    "A seeded random clip batch (B, T, C, H, W) in [-1, 1], the layout every encoder takes."
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def video2():
    return random_video(2)


@pytest.fixture(scope="module")
def video1():
    return random_video(1)
