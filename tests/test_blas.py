"""mlx_distill.blas: finding OpenBLAS, the preload environment, and the CLI's one-time re-exec."""

import json
import os
import subprocess
import sys

import pytest

from mlx_distill import blas

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux-only")


@pytest.fixture
def fake_lib(tmp_path, monkeypatch):
    lib = tmp_path / "libblas.so.3"
    lib.write_bytes(b"")
    monkeypatch.setenv("MLX_DISTILL_OPENBLAS", str(lib))
    return str(lib)


def clean_env(**extra) -> dict:
    """This process's environment without any preload decision taken (as a user's shell)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "MLX_DISTILL_BLAS_CHECKED", "MLX_DISTILL_OPENBLAS")}
    return {**env, **extra}


def test_find_openblas_honours_env(fake_lib, monkeypatch):
    assert blas.find_openblas() == fake_lib
    monkeypatch.setenv("MLX_DISTILL_OPENBLAS", fake_lib + ".missing")
    assert blas.find_openblas() is None  # an explicit path that is not there is not silently replaced


def test_find_openblas_candidates(monkeypatch):
    monkeypatch.delenv("MLX_DISTILL_OPENBLAS", raising=False)
    found = blas.find_openblas()
    assert found is None or found in blas.CANDIDATES


@linux_only
def test_preload_env_prepends_once(fake_lib):
    env = blas.preload_env({"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{fake_lib}:/opt/other.so" and env["PATH"] == "/bin"
    assert blas.preload_env(env)["LD_PRELOAD"] == env["LD_PRELOAD"]  # idempotent
    assert blas.preload_env({})["LD_PRELOAD"] == fake_lib
    src = {"LD_PRELOAD": ""}
    blas.preload_env(src)
    assert src == {"LD_PRELOAD": ""}  # a copy, never the caller's dict


@linux_only
def test_preload_env_without_openblas(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_DISTILL_OPENBLAS", str(tmp_path / "none.so"))
    assert "LD_PRELOAD" not in blas.preload_env({"PATH": "/bin"})


def test_preloaded_and_status(monkeypatch, fake_lib):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
    assert blas.preloaded()
    monkeypatch.setenv("LD_PRELOAD", "")
    assert not blas.preloaded()
    s = blas.status()
    assert s["openblas_found"] == fake_lib and s["preloaded"] is False


@linux_only
def test_ensure_fast_blas_execs_once_with_preload(monkeypatch, fake_lib):
    calls = []
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(blas._ENV_DONE, raising=False)
    for mod in ("mlx", "mlx.core"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    monkeypatch.setattr(blas.os, "execve", lambda exe, args, env: calls.append((exe, args, env)))
    blas.ensure_fast_blas(["-m", "mlx_distill", "train"])
    (exe, args, env), = calls
    assert exe == sys.executable and args == [sys.executable, "-m", "mlx_distill", "train"]
    assert env["LD_PRELOAD"].split(":")[0] == fake_lib and env[blas._ENV_DONE] == "1"
    blas.ensure_fast_blas(["-m", "mlx_distill", "train"])  # the marker stops a second exec
    assert len(calls) == 1


@linux_only
def test_ensure_fast_blas_never_execs_after_mlx_import_or_without_openblas(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(blas.os, "execve", lambda *a: pytest.fail("must not re-exec"))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(blas._ENV_DONE, raising=False)
    monkeypatch.setitem(sys.modules, "mlx", sys.modules.get("mlx") or object())
    blas.ensure_fast_blas(["-m", "mlx_distill"])  # too late to swap this process's BLAS
    monkeypatch.delitem(sys.modules, "mlx")
    monkeypatch.delitem(sys.modules, "mlx.core", raising=False)
    monkeypatch.setenv("MLX_DISTILL_OPENBLAS", str(tmp_path / "none.so"))
    blas.ensure_fast_blas(["-m", "mlx_distill"])
    assert "libopenblas0-pthread" in capsys.readouterr().err
    assert os.environ[blas._ENV_DONE] == "1"


@linux_only
@pytest.mark.skipif(blas.find_openblas() is None and not os.environ.get("MLX_DISTILL_OPENBLAS"),
                    reason="no OpenBLAS installed")
def test_cli_reexecs_with_openblas_preloaded():
    """A real `python -m mlx_distill model info` started without LD_PRELOAD reports, from inside
    the re-executed process, that OpenBLAS is preloaded (info never converts the model: fast)."""
    lib = blas.find_openblas()
    r = subprocess.run([sys.executable, "-m", "mlx_distill", "model", "info"], env=clean_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)["blas"]
    assert status["preloaded"] is True and status["ld_preload"].split(":")[0] == lib
    # the marker of an earlier check stops the re-exec: that process keeps the reference BLAS
    r = subprocess.run([sys.executable, "-m", "mlx_distill", "model", "info"],
                       env=clean_env(MLX_DISTILL_BLAS_CHECKED="1"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["blas"]["preloaded"] is False
