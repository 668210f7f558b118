"""The CI gates: each LOOPED_REQUIRE_* that tests/ reads is exported by .ci/run, and turns its own skip (a
missing fixture, optional library or browser) into a failure while leaving the other skips alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import require_optional

ROOT = Path(__file__).resolve().parents[1]

# A gate → a test module that reaches that gate's skip; the thing it needs is missing by construction (a
# fixture and a module that do not exist; a PATH without chromium).
PROBES = {
    "FIXTURES": "from helpers import fixture_dir\n\n\ndef test_probe():\n    fixture_dir('no-such-fixture')\n",
    "HF": "from helpers import require_optional\n\n\ndef test_probe():\n"
    "    require_optional('no_such_module_for_the_gate_test', 'test')\n",
    "VLLM": "import os\n\nfrom helpers import vllm_python\n\n\ndef test_probe():\n"
    "    os.environ['LOOPED_VLLM_PYTHON'] = '/no/such/python'\n    vllm_python()\n",
    "BROWSER": f"import sys\n\nsys.path.insert(0, {str(ROOT / 'tests' / 'serve')!r})\n"
    "from test_playground import browser  # noqa: E402, F401\n\n\ndef test_probe(browser):\n    pass\n",
}


def gates_read_by_tests() -> set[str]:
    here = Path(__file__).resolve()
    found = set()
    for path in (ROOT / "tests").rglob("*.py"):
        if path.resolve() != here:
            found |= set(re.findall(r"LOOPED_REQUIRE_([A-Z_]+)", path.read_text()))
    return found


def test_every_gate_has_a_probe_and_ci_sets_it():
    ci = (ROOT / ".ci" / "run").read_text()
    assert gates_read_by_tests() == set(PROBES)
    for gate in PROBES:
        assert re.search(rf"^export LOOPED_REQUIRE_{gate}=1\b", ci, re.MULTILINE), (
            f"{gate} not set by .ci/run"
        )


def outcomes(folder: Path, gate: str) -> dict[str, tuple[str, str]]:
    """Run the probes in a fresh pytest with only LOOPED_REQUIRE_{gate}=1: {gate: (outcome, message)}."""
    for name, source in PROBES.items():
        (folder / f"test_probe_{name.lower()}.py").write_text(source)
    (folder / "pytest.ini").write_text("[pytest]\n")
    empty = folder / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPED_REQUIRE_")}
    env.update({f"LOOPED_REQUIRE_{gate}": "1", "PATH": str(empty), "PYTHONPATH": str(ROOT / "tests")})
    report = folder / "report.xml"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={report}", str(folder)]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert report.is_file(), proc.stdout + proc.stderr
    found = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("classname", "").rsplit("test_probe_", 1)[-1].upper()
        result = next(iter(case), None)
        found[name] = ("passed", "") if result is None else (result.tag, result.get("message", ""))
    return found


@pytest.mark.parametrize("gate", sorted(PROBES))
def test_a_gate_turns_its_skip_into_a_failure(tmp_path, gate):
    if gate == "BROWSER":
        require_optional("selenium", "test")  # without selenium the browser is never looked for
    found = outcomes(tmp_path, gate)
    assert set(found) == set(PROBES), found
    outcome, message = found[gate]
    assert outcome in ("failure", "error") and f"LOOPED_REQUIRE_{gate}=1" in message, found[gate]
    for other in set(PROBES) - {gate}:
        assert found[other][0] == "skipped", (other, found[other])
