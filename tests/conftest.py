import pytest
import torch


@pytest.fixture
def threads(request):
    """Run the test with torch's intra-op thread count set to the parametrized value (indirect),
    restored afterwards even when the test changes it."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
