"""The xdist server groups of tests/conftest.py name real modules, once each: a renamed
module would otherwise leave its server tests refused at collection (or a stale entry)."""

from tests.conftest import GROUP_OF_MODULE, SERVER_GROUPS
from tests.helpers import REPO


def test_every_grouped_module_exists_and_is_in_one_group():
    listed = [module for modules in SERVER_GROUPS.values() for module in modules]
    assert len(listed) == len(set(listed)) == len(GROUP_OF_MODULE)
    missing = [path for path in GROUP_OF_MODULE if not (REPO / path).is_file()]
    assert not missing, f"SERVER_GROUPS names modules that do not exist: {missing}"
