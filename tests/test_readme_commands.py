"""Commands the README gives for the examples, read from the README itself (tests run them exactly)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands() -> list[str]:
    """Every line of a ```bash block in the README (comments stripped)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    return out


def readme_command(prefix: str) -> str:
    """The one README command line that starts with ``prefix``."""
    hits = [c for c in readme_commands() if c.startswith(prefix)]
    assert len(hits) == 1, f"the README should give exactly one command starting {prefix!r}, found {hits}"
    return hits[0]


def test_the_readme_installs_this_package_only_from_a_checkout_or_a_wheel():
    """No line installs vgs-kernels by an index name: it is not on an index."""
    text = open(os.path.join(ROOT, "README.md")).read()
    assert not re.search(r"pip install[^\n`]*['\"]?vgs[-_]kernels(\[|['\"\s]|$)", text), \
        "a README line installs vgs-kernels by name"
