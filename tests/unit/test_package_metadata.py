"""One identity and one address across pyproject.toml, debian/ and LICENSE."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from support import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_one_identity_and_one_address_everywhere():
    control = (ROOT / "debian" / "control").read_text()
    maintainer = re.search(r"^Maintainer: (.+)$", control, re.M).group(1)
    author = PYPROJECT["authors"][0]
    assert maintainer == f"{author['name']} <{author['email']}>"
    trailer = re.findall(r"^ -- (.+?)  ", (ROOT / "debian" / "changelog").read_text(), re.M)
    assert set(trailer) == {maintainer}
    assert re.search(r"^Homepage: (.+)$", control, re.M).group(1) == \
        PYPROJECT["urls"]["Homepage"]
    copyright_ = (ROOT / "debian" / "copyright").read_text()
    assert re.search(r"^Source: (.+)$", copyright_, re.M).group(1) == PYPROJECT["urls"]["Source"]
    assert PYPROJECT["urls"]["Homepage"].startswith(PYPROJECT["urls"]["Source"] + "/")
    assert "License: Apache-2.0" in copyright_ and PYPROJECT["license"]["text"] == "Apache-2.0"
    assert (ROOT / "LICENSE").read_text().split() == \
        Path("/usr/share/common-licenses/Apache-2.0").read_text().split()
