"""The shipped Prometheus alert rules: valid, and firing exactly where their unit tests say (promtool)."""

import shutil
import subprocess

import pytest

from support import ROOT

RULES = ROOT / "deploy" / "prometheus"
pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="promtool is not installed (scripts/test.sh installs Debian's prometheus)")


def test_rules_pass_promtool_check_and_their_unit_tests():
    check = subprocess.run(["promtool", "check", "rules", str(RULES / "alerts.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout + check.stderr
    tested = subprocess.run(["promtool", "test", "rules", str(RULES / "alerts_test.yml")], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
