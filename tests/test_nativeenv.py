"""The native libraries' settings the entry points make before torch loads: set unless the user chose."""
import os
import subprocess
import sys

from smolthink import nativeenv
from smolthink.nativeenv import native_env

NAMES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def test_defaults_unless_the_user_chose(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    cap = str(nativeenv.CACHE_CAPACITY)
    assert native_env() == {"OMP_WAIT_POLICY": "PASSIVE", "LRU_CACHE_CAPACITY": cap,
                            "ONEDNN_PRIMITIVE_CACHE_CAPACITY": cap}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "1024")
    assert native_env()["OMP_WAIT_POLICY"] == "ACTIVE" and os.environ["LRU_CACHE_CAPACITY"] == "1024"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")  # a spin count of the user's own: libgomp's default policy
    assert "OMP_WAIT_POLICY" not in native_env() and "OMP_WAIT_POLICY" not in os.environ


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
    assert out.stdout.split()[-2:] == ["PASSIVE", str(nativeenv.CACHE_CAPACITY)], out.stderr[-500:]
