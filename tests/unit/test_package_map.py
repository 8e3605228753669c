"""The package's docstring tells a newcomer where every module sits on a request's path."""

from __future__ import annotations

import re
from pathlib import Path

import proxy

PACKAGE = Path(proxy.__file__).parent
MAP = proxy.__doc__ or ""


def test_every_module_and_sub_package_is_named_in_the_package_map() -> None:
    modules = {path.name for path in PACKAGE.glob("*.py")} - {"__init__.py"}
    packages = {f"{path.parent.name}/" for path in PACKAGE.glob("*/__init__.py")}
    assert {name for name in modules | packages if name not in MAP} == set()


def test_the_request_path_is_numbered_in_order() -> None:
    steps = [int(number) for number in re.findall(r"^ ?(\d+)\. ", MAP, re.MULTILINE)]
    assert steps == list(range(1, len(steps) + 1))
    assert len(steps) >= 10
