"""Atomic writes: all or nothing, with normal file permissions."""

import os
import stat

import pytest

from fit3d.io import atomic_path, write_json


def test_failed_write_leaves_old_file_and_no_temp(tmp_path) -> None:
    target = tmp_path / "meta.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text().strip().endswith("}") and '"a": 1' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_written_file_gets_umask_permissions(tmp_path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    write_json(tmp_path / "x.json", [1])
    mode = stat.S_IMODE((tmp_path / "x.json").stat().st_mode)
    assert mode == 0o666 & ~umask
