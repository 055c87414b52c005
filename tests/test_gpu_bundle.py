"""tools/gpu_bundle.py, tools/import_log.py and tools/gsplat_kernels.py: the GPU bundle's checks
(dependencies against the machine's list, the travelling size), version pinning for the CPU
rehearsal, the import audit, and the gsplat op list against gsplat's own sources. No network,
nothing compiled."""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_bundle as gb  # noqa: E402
import gsplat_kernels as gk  # noqa: E402
import import_log  # noqa: E402

MACHINE = {"torch": "2.11.0", "numpy": "2.5.2", "rich": None, "ninja": None, "jaxtyping": None}


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A minimal wheel whose METADATA declares `requires`."""
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires) + "\nlong description\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def test_machine_list_parses_names_and_versions(tmp_path):
    f = tmp_path / "m.txt"
    f.write_text("# comment\nTorch==2.11.0\n\npytorch_lightning==2.6.6  # note\nPyYAML\n")
    assert gb.read_machine(f) == {"torch": "2.11.0", "pytorch-lightning": "2.6.6", "pyyaml": None}
    real = gb.read_machine()
    assert real["torch"] == "2.11.0" and "gsplat" not in real and "pycolmap" not in real


def test_dependencies_on_the_machine_or_bundled_pass(tmp_path):
    wheels = [
        _wheel(tmp_path, "gsplat", "1.5.3", [
            "ninja", "numpy", "jaxtyping", "rich>=12", "torch",
            'typing_extensions; python_version < "3.8"',  # not for 3.12
            'black[jupyter]==22.3.0; extra == "dev"',  # an extra nobody asks for
            "helper>=1",  # bundled below
        ]),
        _wheel(tmp_path, "helper", "1.2", ['pywin32; sys_platform == "win32"']),
    ]  # fmt: skip
    assert gb.unmet(wheels, MACHINE) == []


def test_missing_or_too_old_dependencies_and_duplicates_are_reported(tmp_path):
    a = _wheel(tmp_path, "pkg-a", "1.0", ["numpy>=3", "absent-thing", "torch<3"])
    b = _wheel(tmp_path, "pkg_a", "2.0", [])  # the same distribution, another version
    problems = gb.unmet([a, b], MACHINE)
    assert any("bundled twice" in p for p in problems)
    assert any("numpy>=3: the machine has 2.5.2" in p for p in problems)
    assert any("absent-thing: not on the machine, not bundled" in p for p in problems)
    assert not any("torch" in p for p in problems)  # 2.11.0 satisfies <3
    assert len(problems) == 3


def _git_tree(root: Path) -> None:
    """A repo with a tracked file (100 B), an untracked one (30 B), an ignored one (1000 B)."""
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "tracked.txt").write_bytes(b"t" * 100)
    (root / ".gitignore").write_text("ignored/\n")
    subprocess.run(["git", "-C", str(root), "add", "tracked.txt", ".gitignore"], check=True)
    (root / "untracked.txt").write_bytes(b"u" * 30)
    (root / "ignored").mkdir()
    (root / "ignored" / "big.bin").write_bytes(b"i" * 1000)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_travelling_size_counts_tracked_and_untracked_not_ignored(tmp_path):
    _git_tree(tmp_path)
    assert gb.travelling_bytes(tmp_path) == 100 + 30 + len("ignored/\n")
    assert gb.dir_bytes(tmp_path / "ignored") == 1000
    assert gb.dir_bytes(tmp_path / "nowhere") == 0


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_check_enforces_the_size_limit_and_the_bundle_list(tmp_path, capsys, monkeypatch):
    _git_tree(tmp_path)
    bundle = tmp_path / "ignored"
    (bundle / "big.bin").unlink()
    _wheel(bundle, "gsplat", "1.5.3", ["torch", "numpy"])
    monkeypatch.setattr(gb, "BUNDLE", ("gsplat==1.5.3",))
    size_mib = (gb.travelling_bytes(tmp_path) + gb.dir_bytes(bundle)) / 2**20
    assert gb.check(bundle, tmp_path, 60, MACHINE) == 0
    assert gb.check(bundle, tmp_path, size_mib * 0.99, MACHINE) == 1
    assert "is not under" in capsys.readouterr().out
    monkeypatch.setattr(gb, "BUNDLE", ("gsplat==1.5.3", "other==1.0"))
    assert gb.check(bundle, tmp_path, 60, MACHINE) == 1
    assert "other: missing from the bundle" in capsys.readouterr().out
    assert gb.check(tmp_path / "empty", tmp_path, 60, MACHINE) == 1


def test_nearest_version_prefers_the_same_then_older_then_newer():
    v = gb.Version
    offered = [v("2.4.6"), v("2.4.0"), v("2.3.1"), v("3.0")]
    assert gb.nearest(v("2.4.0"), offered) == v("2.4.0")
    assert gb.nearest(v("2.5.2"), offered) == v("2.4.6")  # newest older
    assert gb.nearest(v("1.0"), offered) == v("2.3.1")  # oldest newer
    assert gb.nearest(v("1.0"), []) is None


def test_pins_use_overrides_machine_versions_and_the_nearest(monkeypatch):
    offered = {"numpy": ["2.4.6", "2.5.2"], "lightning": ["2.6.5", "2.6.7"]}
    monkeypatch.setattr(
        gb, "available_versions", lambda py, name: [gb.Version(x) for x in offered.get(name, [])]
    )
    monkeypatch.setattr(gb, "REHEARSAL", ("torch", "numpy", "lightning", "rich", "onnx"))
    machine = {"torch": "2.11.0", "numpy": "2.5.2", "lightning": "2.6.6", "rich": None}
    machine["onnx"] = "1.23.1"
    lines = {line: note for line, _, note in gb.pins("python", machine)}
    assert lines.keys() == {"torch==2.14.1", "numpy==2.5.2", "lightning==2.6.5", "rich", "onnx"}
    assert lines["numpy==2.5.2"] == "same"
    assert "nearest" in lines["lightning==2.6.5"]


def test_audit_passes_listed_standard_and_project_modules_only(tmp_path):
    log = tmp_path / "1.txt"
    pytest_file = importlib.util.find_spec("_pytest.python").origin  # a file pytest's RECORD lists
    log.write_text(
        "os\t/usr/lib/python3/os.py\n"  # standard library, by name
        f"fit3d\t{ROOT / 'fit3d' / '__init__.py'}\n"  # the checkout
        f"_pytest_python\t{pytest_file}\n"  # a distribution's file: allowed or not
        "mystery_mod\t/elsewhere/mystery_mod.py\n"  # from nowhere known
        "_cython_3_0_0\t\n"  # made at run time: no file, no distribution
        f"built_ext\t{tmp_path / 'ext' / 'built_ext.so'}\n"  # a kernel built at run time
    )
    bad = gb.audit([log], {"pytest"}, [*gb.PROJECT, tmp_path / "ext"])
    assert bad == ["mystery_mod: no distribution found (/elsewhere/mystery_mod.py)"]
    # a distribution's file counts as that distribution's even inside a root (a venv in the repo)
    bad = gb.audit([log], set(), [*gb.PROJECT, tmp_path / "ext", Path(pytest_file).parents[2]])
    assert len(bad) == 2 and bad[0] == "_pytest_python: from pytest, not on the machine"


def test_import_log_writes_this_process_modules(tmp_path, monkeypatch):
    monkeypatch.delenv(import_log.ENV, raising=False)
    assert import_log.write() is None
    monkeypatch.setenv(import_log.ENV, str(tmp_path))
    path = import_log.write()
    rows = dict(line.split("\t") for line in path.read_text().splitlines())
    assert rows["pytest"] == sys.modules["pytest"].__file__ and rows["sys"] == ""
    assert not any("." in name for name in rows)


def _gsplat_cuda_dir() -> Path:
    spec = importlib.util.find_spec("gsplat")
    if spec is None or spec.origin is None:
        pytest.skip("gsplat not installed")
    return Path(spec.origin).parent / "cuda"


def _ops_reached(wrapper: Path, functions: set[str]) -> set[str]:
    """`_C` names (ops, enums) used by `functions` of gsplat's _wrapper.py and by the autograd
    Functions they call (`X.apply`)."""
    tree = ast.parse(wrapper.read_text())
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    todo, seen, names = list(functions), set(), set()
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        for node in ast.walk(defs[name]):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "").startswith("_make_lazy"):
                arg = node.args[0]
                if isinstance(arg, ast.Constant):
                    names.add(arg.value)
                elif isinstance(arg, ast.JoinedStr):  # f"CameraModelType.{...}"
                    names.add(arg.values[0].value.rstrip("."))
            if isinstance(node, ast.Attribute) and node.attr == "apply":
                todo.append(getattr(node.value, "id", ""))
    return names


def test_gsplat_op_list_is_what_the_3dgs_path_calls_and_its_sources_define_it():
    cuda = _gsplat_cuda_dir()
    used = {"fully_fused_projection", "isect_tiles", "isect_offset_encode", "rasterize_to_pixels",
            "spherical_harmonics"}  # fmt: skip
    reached = _ops_reached(cuda / "_wrapper.py", used)
    # the camera enum is bound too; proj/quat_scale_to_covar only serve other callers
    expected = set(gk.OPS) | {"CameraModelType"}
    missing = reached - expected
    assert not missing, f"gsplat's 3DGS path calls ops gsplat_kernels.OPS leaves out: {missing}"
    assert set(gk.OPS) <= reached
    rendering = (cuda.parent / "rendering.py").read_text()
    for fn in used:
        assert fn in rendering
    sources = {s: (cuda / s).read_text() for s in gk.SOURCES}
    for op in gk.OPS:
        defined = (re.search(rf"(^|\s){op}\(", t, re.M) for s, t in sources.items())
        assert any(defined), f"{op} is defined in none of {gk.SOURCES}"
    binding = gk.binding_source()
    assert all(f'm.def("{op}", &gsplat::{op});' in binding for op in gk.OPS)
    assert binding.count(".value(") == len(gk.CAMERA_MODELS)
    ext = (cuda / "ext.cpp").read_text()  # gsplat's own binding: the same enum values
    assert all(f"gsplat::CameraModelType::{v})" in ext for v in gk.CAMERA_MODELS)
