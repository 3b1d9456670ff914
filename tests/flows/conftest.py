import pytest


@pytest.fixture(scope="session")
def e2e_root(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")
