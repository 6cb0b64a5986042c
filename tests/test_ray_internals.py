"""The adapter to Ray's private parts (orchestrator/ray_internals.py), without a cluster: the
version check, the error for a private part that is missing, that every private part it names is
in the installed Ray (the check to run on a Ray upgrade), and that nothing else in the project
reaches into Ray's private parts."""

from __future__ import annotations

import ast
import logging
import re
import sys
from pathlib import Path

import pytest
import ray
from packaging.requirements import Requirement

from orchestrator import ray_internals
from orchestrator.errors import UserError
from orchestrator.ray_internals import SUPPORTED_RAY, UnsupportedRay, attribute_of, check_ray_version, internal

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10, where pytest brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = ROOT / "orchestrator" / "ray_internals.py"
PRIVATE_RAY = re.compile(r"ray\._private|ray\._raylet|_global_node|autoscaler[./]_private|from ray[\w.]* import _")
"""Ways into Ray's private parts: a module path, the driver's node, the monitor's script path,
and a private module imported by name."""


# --- the version ---------------------------------------------------------------------------------

def test_the_installed_ray_is_the_supported_one():
    check_ray_version()


@pytest.mark.parametrize("version", [f"{SUPPORTED_RAY}.0", f"{SUPPORTED_RAY}.3", f"{SUPPORTED_RAY}.1rc1"])
def test_any_patch_release_of_the_supported_ray_passes(version):
    check_ray_version(installed=version)


@pytest.mark.parametrize("version", ["2.61.0", "2.6.0", "2.600.1", "3.0.0.dev0"])
def test_another_ray_release_is_refused_with_the_fix(version):
    with pytest.raises(UnsupportedRay) as refused:
        check_ray_version(installed=version)
    message = str(refused.value)
    assert f"Ray {version} is installed" in message and f"supports Ray {SUPPORTED_RAY} only" in message
    assert "pip install 'ray[default,train]==2.60.0'" in message
    assert isinstance(refused.value, UserError)  # the CLI prints it without a traceback, exit 2


def test_the_supported_ray_is_the_one_pyproject_pins():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_pin = next(r for r in map(Requirement, dependencies) if r.name == "ray")
    (pinned,) = [s.version for s in ray_pin.specifier if s.operator == "=="]
    assert pinned.startswith(SUPPORTED_RAY + ".")
    assert ray_internals.INSTALL_SUPPORTED_RAY.endswith(f"=={pinned}'")


# --- a missing private part ----------------------------------------------------------------------

def test_a_missing_attribute_is_named_with_the_supported_ray():
    with pytest.raises(UnsupportedRay) as missing:
        internal("ray._private.worker:no_such_part")
    message = str(missing.value)
    assert message.startswith("ray._private.worker.no_such_part is not in the installed Ray " + ray.__version__)
    assert f"private part of Ray {SUPPORTED_RAY}" in message and "pip install 'ray[default,train]==" in message


def test_a_missing_module_is_named():
    with pytest.raises(UnsupportedRay, match=r"^ray\._private\.no_such_module is not in the installed Ray"):
        internal("ray._private.no_such_module:anything")


def test_a_missing_attribute_of_an_object_ray_handed_out_is_named():
    node_without_head = object()
    with pytest.raises(UnsupportedRay, match=r"^ray\._private\.worker\._global_node\.head is not in"):
        attribute_of(node_without_head, "head", "ray._private.worker:_global_node")


def test_a_module_that_lacks_a_dependency_says_so_not_that_ray_changed(tmp_path, monkeypatch):
    (tmp_path / "needs_a_dependency.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency"):
        internal("needs_a_dependency:anything")


# --- what the installed Ray has ------------------------------------------------------------------

def _named_private_parts() -> list[str]:
    """Every "module:attribute" the adapter names."""
    tree = ast.parse(ADAPTER.read_text())
    return sorted({node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                   and isinstance(node.value, str) and re.fullmatch(r"ray(\.\w+)+:[\w.]+", node.value)})


def test_every_private_part_the_adapter_names_is_in_the_installed_ray():
    parts = _named_private_parts()
    assert "ray._private.worker:_global_node" in parts and "ray._raylet:Config.initialize" in parts
    for path in parts:
        internal(path)


def test_the_monitor_scripts_it_looks_for_are_rays():
    ray_dir = Path(ray.__file__).parent
    for script in ray_internals._MONITOR_SCRIPTS:
        assert (ray_dir / script).is_file(), script


def test_without_a_ray_node_there_is_no_session_dir_and_nothing_started_here():
    ray.shutdown()  # a test before this one in the same process may have left Ray connected
    assert ray_internals.session_dir() is None
    assert ray_internals.started_here() is False


def test_rays_error_messages_go_to_the_given_log(monkeypatch, caplog):
    worker = internal("ray._private.worker")
    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # put back after the test
    target = logging.getLogger("test_ray_internals.target")
    ray_internals.send_ray_errors_to(target)
    with caplog.at_level(logging.WARNING, logger=target.name):
        worker.print_to_stdstream({"lines": ["a node died"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert [r.getMessage() for r in caplog.records if r.name == target.name] == ["ray (raylet): a node died"]


# --- nothing else reaches in ---------------------------------------------------------------------

def test_only_the_adapter_reaches_into_rays_private_parts():
    offenders = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for package in ("orchestrator", "jobs") for path in sorted((ROOT / package).rglob("*.py"))
                 if path != ADAPTER
                 for number, line in enumerate(path.read_text().splitlines(), 1) if PRIVATE_RAY.search(line)]
    assert not offenders, "Ray's private parts outside orchestrator/ray_internals.py:\n" + "\n".join(offenders)
