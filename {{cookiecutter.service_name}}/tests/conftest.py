import pytest

from {{ cookiecutter.package_name }}.handlers import router
from {{ cookiecutter.package_name }}.runtime.testing import ServiceHarness


@pytest.fixture
def service() -> ServiceHarness:
    """Your handlers behind the real loop, on a private in-memory bus and state store."""
    return ServiceHarness(router)
