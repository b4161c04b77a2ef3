"""Training tests run torch on one thread: the models are small, and with several threads torch's
workers contend with the core's OpenMP threads (and anything else on a 2-core machine), which makes
small models 20-50x slower without changing results."""
import pytest

torch = pytest.importorskip("torch", reason="training tests need torch (the test or train extra)")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
