import subprocess
import sys
from pathlib import Path

import darwin

ROOT = Path(__file__).resolve().parents[1]


def test_the_core_never_imports_prefect():
    modules = sorted(f"darwin.{p.relative_to(ROOT / 'darwin').with_suffix('').as_posix().replace('/', '.')}"
                     for p in (ROOT / "darwin").rglob("*.py") if p.name != "__init__.py")
    code = ("import sys, importlib\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    assert len(modules) > 15


def test_tasks_and_flows_packages_are_ours():
    import flows
    import tasks

    assert Path(tasks.__file__).parent == ROOT / "tasks" and Path(flows.__file__).parent == ROOT / "flows"
    assert Path(darwin.__file__).parent == ROOT / "darwin"


def test_merge_command_starts_without_prefect():
    code = "import sys, flows.cli, flows.merge; print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
