"""How the extension was built: things no kernel test would notice until an error path runs."""

import shutil
import subprocess
import sys

import bn_cuda._C
import pytest


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("readelf") is None, reason="needs Linux and readelf"
)
def test_extension_uses_the_shared_cxx_runtime():
    """The extension depends on libstdc++.so, the C++ runtime torch uses, rather than carrying a
    static copy of it (setup.py, shared_cxx_runtime_link_args): with a second copy, error messages
    that format numbers lost them (GCC 12) or crashed the process (GCC 13)."""
    dynamic = subprocess.run(["readelf", "-d", bn_cuda._C.__file__], check=True, capture_output=True, text=True)
    assert "libstdc++.so" in dynamic.stdout
