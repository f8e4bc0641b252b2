"""The test suite (trial)."""

import os as _os

# trial -j gives its workers PYTHONPATH (trial's own sys.path, with
# pyenv's standard library); a program the tests run (getmail6 on Debian's
# python3, a scratch venv's python) must not inherit it.
_os.environ.pop("PYTHONPATH", None)
