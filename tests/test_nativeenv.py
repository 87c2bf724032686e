"""The native libraries' settings the entry points make before torch loads: set unless the user chose."""
import os
import subprocess
import sys

from smolthink import nativeenv
from smolthink.nativeenv import NAMES, native_env


def test_defaults_unless_the_user_chose(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    cap = str(nativeenv.CACHE_CAPACITY)
    # libgomp keeps its own wait policy: no OMP_WAIT_POLICY / GOMP_SPINCOUNT appear
    assert native_env() == {"LRU_CACHE_CAPACITY": cap, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": cap}
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "1024")
    got = native_env()
    assert got["OMP_WAIT_POLICY"] == "PASSIVE" and got["LRU_CACHE_CAPACITY"] == "1024"
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == cap


def test_the_cli_sets_them_before_torch_is_imported():
    """What a fresh `smolthink` process has in its environment by the time torch loads."""
    env = {k: v for k, v in os.environ.items() if k not in NAMES}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    code = ("import os, sys; import smolthink.cli as c; seen = {}\n"
            "class Hook:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' and not seen: seen.update(os.environ)\n"
            "sys.meta_path.insert(0, Hook())\n"
            "try: c.main(['tasks'])\n"
            "except SystemExit: pass\n"
            "import torch\n"
            "print(seen.get('OMP_WAIT_POLICY'), seen.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split()[-2:] == ["None", str(nativeenv.CACHE_CAPACITY)], out.stderr[-500:]
