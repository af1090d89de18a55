"""Fixtures shared by the reliability tests."""
import pytest


@pytest.fixture(scope='module')
def one_torch_thread():
    """PyTorch on one thread for a module: on a busy 2-core machine its pool of two is far
    slower (rtmdet-tiny at 64x96: 0.5-1.9 s per image, against 0.09 s on one). Restored after."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
