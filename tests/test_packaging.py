"The package metadata says only what is tested: Python and torch versions, the TPU extras, license and typing."
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCK = dict(line.split("==") for line in (ROOT / "requirements/lock.txt").read_text().split() if "==" in line)
WORKFLOWS = ROOT / ".github/workflows"


def _requirements(extra=None):
    reqs = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return {(r.name.replace("-", "_"), frozenset(r.extras)): r for r in map(Requirement, reqs)}


def _minor(version): return tuple(int(x) for x in version.split(".")[:2])


def test_python_floor_is_the_version_ci_tests():
    ci = yaml.safe_load((WORKFLOWS / "test.yaml").read_text())
    versions = {step["with"]["python-version"] for step in ci["jobs"]["test"]["steps"]
                if step.get("uses", "").startswith("actions/setup-python")}
    assert PROJECT["requires-python"] == f">={min(versions, key=_minor)}", (PROJECT["requires-python"], versions)


def test_torch_floor_is_the_torch_ci_tests():
    (spec,) = _requirements()[("torch", frozenset())].specifier
    assert spec.operator == ">=" and _minor(spec.version) == _minor(LOCK["torch"]), (str(spec), LOCK["torch"])


def test_xla_extras_pin_the_torch_that_torch_xla_needs():
    torch, xla = LOCK["torch"], LOCK["torch-xla"]
    assert _minor(torch) == _minor(xla)  # torch_xla x.y.z is built against torch x.y.z
    reqs = _requirements("xla")
    assert str(reqs[("torch", frozenset())].specifier) == f"=={torch}"
    assert str(reqs[("torch_xla", frozenset())].specifier) == f"=={xla}"
    tpu, pallas = _requirements("tpu"), _requirements("pallas")
    assert ("vishwamai", frozenset({"xla"})) in tpu
    assert str(tpu[("torch_xla", frozenset({"tpu"}))].specifier) == f"=={xla}"  # brings libtpu
    assert ("vishwamai", frozenset({"tpu"})) in pallas
    assert str(pallas[("torch_xla", frozenset({"pallas"}))].specifier) == f"=={xla}"  # brings JAX


def test_make_setup_installs_extras_that_exist():
    extras = re.search(r'-e "\.\[([^\]]+)\]"', (ROOT / "Makefile").read_text())[1].split(",")
    assert set(extras) <= set(PROJECT["optional-dependencies"]), extras


def test_release_publishes_only_after_the_tests_pass():
    jobs = yaml.safe_load((WORKFLOWS / "release.yaml").read_text())["jobs"]
    tests = [name for name, job in jobs.items() if job.get("uses") == "./.github/workflows/test.yaml"]
    assert tests and set(tests) <= set(jobs["publish"]["needs"]), jobs["publish"]["needs"]
    test_workflow = yaml.safe_load((WORKFLOWS / "test.yaml").read_text())
    assert "workflow_call" in test_workflow[True]  # YAML 1.1 reads the key `on` as True
    assert any(step.get("run") == "make test" for step in test_workflow["jobs"]["test"]["steps"])


def test_wheel_ships_the_license_and_the_typing_marker(tmp_path):
    assert PROJECT["license"] == "Apache-2.0"
    assert "Apache License\n                           Version 2.0" in (ROOT / "LICENSE").read_text()
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("vishwamai-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vishwamai/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
