"""Copies the top-level `templates/` (the source of truth for systemd unit templates) into the
built package as `reconciler/units/templates/`, so an installed wheel or Nix package renders
units without a source checkout. Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TEMPLATES = Path(__file__).resolve().parent / "templates"
PACKAGED = Path("reconciler") / "units" / "templates"


class BuildPyWithTemplates(build_py):
    def run(self) -> None:
        super().run()
        if not TEMPLATES.is_dir():
            raise SystemExit(f"setup.py: {TEMPLATES} is missing; the unit templates live there")
        target = Path(self.build_lib) / PACKAGED
        target.mkdir(parents=True, exist_ok=True)
        # *.j2: the unit templates; hardening.json: the sandboxing they (and NixOS) share.
        for template in sorted([*TEMPLATES.glob("*.j2"), *TEMPLATES.glob("*.json")]):
            self.copy_file(str(template), str(target / template.name))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        # Listed so that wheels, `install --record` and editable installs know about them.
        names = [str(Path(self.build_lib) / PACKAGED / t.name) for t in [*TEMPLATES.glob("*.j2"), *TEMPLATES.glob("*.json")]]
        return [*super().get_outputs(include_bytecode), *names]


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__
    setup(cmdclass={"build_py": BuildPyWithTemplates})
