import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for these tests: their matrices are small, and on shared cores a second
    thread costs more in hand-offs than it computes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
