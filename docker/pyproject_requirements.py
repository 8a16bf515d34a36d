"""Print the project's pinned dependencies (plus the named extras) one per line, for `pip install -r`.

The Dockerfiles install these before copying the source, so a source edit does not re-download torch.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as handle:
        project = tomllib.load(handle)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml defines {sorted(optional)}")
    wanted = list(project.get("dependencies", [])) + [dep for extra in extras for dep in optional[extra]]
    return list(dict.fromkeys(wanted))  # extras may share a requirement (serve and train: the runtimes)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: pyproject_requirements.py PYPROJECT [EXTRA[,EXTRA...]]", file=sys.stderr)
        return 2
    extras = [extra for extra in (args[1] if len(args) > 1 else "").split(",") if extra]
    print("\n".join(requirements(args[0], extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
