"""A non-editable wheel install finds its configs without the source tree (as in a container)."""

from __future__ import annotations

import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from tests.conftest import REPO, cli_env


def test_wheel_ships_conf_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        env=cli_env(),
    )
    (wheel,) = wheels.glob("dtrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dtrain/conf/config.yaml" in names
    assert "dtrain/conf/experiment/seed_good.yaml" in names
    assert "dtrain/conf/hydra/launcher/slurm.yaml" in names
    assert "hydra_plugins/dtrain_torchrun_launcher/torchrun_launcher.py" in names

    # A fresh environment that borrows torch & co. from this one but holds its own copy of dtrain.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=False, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        env=cli_env(),
    )
    _borrow_site_packages(python)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import dtrain.compose as m; print(m.__file__); print(m.config_dir())"],
        cwd=elsewhere,
        check=True,
        capture_output=True,
        text=True,
        env=cli_env(),
    ).stdout.split()
    assert all(str(env_dir) in path for path in where), where
    # Hydra finds the torchrun launcher plugin in the installed wheel (the hydra_plugins namespace).
    discover = (
        "import inspect; from hydra.core.plugins import Plugins; from hydra.plugins.launcher import Launcher; "
        "print(*[inspect.getfile(c) for c in Plugins.instance().discover(Launcher) "
        "if c.__name__ == 'TorchrunLauncher'])"
    )
    found = subprocess.run(
        [str(python), "-c", discover], cwd=elsewhere, check=True, capture_output=True, text=True, env=cli_env()
    ).stdout.split()
    assert len(found) == 1 and str(env_dir) in found[0], found

    proc = subprocess.run(
        [str(python), "-m", "dtrain", "experiment=poly2d", "trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=cli_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()


def _borrow_site_packages(python: Path) -> None:
    """Let the venv of ``python`` import what the running interpreter has installed, its own packages first.

    ``system_site_packages=True`` would not do: from inside a venv it shows the base interpreter's
    site-packages, not this venv's, so torch & co. would be missing. Instead a ``.pth`` in the venv's
    site-packages lists the running interpreter's site directories, as plain paths: they land on sys.path
    after the venv's own site-packages (where the wheel's dtrain is), and the ``.pth`` files inside them are
    not run, so the editable install of the checkout (a path ``.pth`` or an import hook) is not picked up.
    """
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    borrowed = [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(own) / "_borrowed_site_packages.pth").write_text("".join(f"{d}\n" for d in borrowed))
