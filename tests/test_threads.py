"""CPU kernels run their parallel loops on PyTorch's OpenMP team (hwaware.threads)."""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import hwaware
from hwaware import threads
from hwaware.tvm.vm import with_shared_threads
from hwaware.zoo import get_model
from tests.helpers import assert_close_to_eager

pytestmark = pytest.mark.skipif(threads.openmp_launcher() is None,
                                reason="no libgomp in this process or no C compiler")


def _hook(library: Path) -> int | None:
    return ctypes.c_void_p.in_dll(ctypes.CDLL(str(library)), threads.LAUNCH_HOOK).value


def _launcher_address() -> int | None:
    launcher = threads.openmp_launcher()
    assert launcher is not None
    return ctypes.cast(launcher.hwaware_openmp_launch, ctypes.c_void_p).value


def test_a_compiled_model_runs_its_kernels_on_the_openmp_team(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hooks: list[int | None] = []
    share = threads.share_threads

    def checked(library: str) -> bool:
        done = share(library)
        hooks.append(_hook(Path(library)))  # while the file is still there
        return done

    monkeypatch.setattr(threads, "share_threads", checked)
    left_before = set(Path(tempfile.gettempdir()).glob("hwaware-kernels-*"))
    model, inputs = get_model("resnet_basic_block", small=True)
    compiled = hwaware.compile(model, inputs, db=None)
    assert_close_to_eager(model, compiled, *inputs)  # parallel kernels, launched by OpenMP
    # every library the build loaded (a second one if a fused kernel lost and was dissolved)
    assert hooks and set(hooks) == {_launcher_address()}
    built = len(hooks)

    compiled.save(tmp_path / "saved")  # a loaded library is pointed at the team too
    loaded = hwaware.load(tmp_path / "saved")
    assert hooks[built:] == [_launcher_address()]
    assert _hook(tmp_path / "saved" / "kernels.so") == _launcher_address()
    assert_close_to_eager(model, loaded, *inputs)
    assert set(Path(tempfile.gettempdir()).glob("hwaware-kernels-*")) == left_before


def test_the_team_size_follows_torch_set_num_threads() -> None:
    model, inputs = get_model("resnet_basic_block", small=True)
    compiled = hwaware.compile(model, inputs, db=None)
    threads_before = torch.get_num_threads()
    try:
        for count in (1, threads_before):
            torch.set_num_threads(count)
            assert_close_to_eager(model, compiled, *inputs)
    finally:
        torch.set_num_threads(threads_before)


@pytest.fixture
def launcher_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """monkeypatch for the launcher's environment: the launcher is looked up afresh in the
    test, and again after it with the environment restored."""
    threads.openmp_launcher.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    threads.openmp_launcher.cache_clear()


def test_hwaware_thread_pool_tvm_keeps_tvms_pool(launcher_env: pytest.MonkeyPatch) -> None:
    launcher_env.setenv("HWAWARE_THREAD_POOL", "tvm")
    assert threads.openmp_launcher() is None
    executable = object()
    assert with_shared_threads(executable) is executable
    launcher_env.undo()
    threads.openmp_launcher.cache_clear()
    assert threads.openmp_launcher() is not None and os.environ.get("HWAWARE_THREAD_POOL") is None


def test_an_unusable_cache_folder_keeps_tvms_pool(launcher_env: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")  # the cache folder's parent is a file: mkdir fails
    launcher_env.setenv("XDG_CACHE_HOME", str(blocked))
    assert threads.openmp_launcher() is None
