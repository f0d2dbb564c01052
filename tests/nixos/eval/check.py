"""The NixOS evaluation check CI runs: every scenario, the flake's outputs and
the VM tests' scripts, evaluated with the real nixpkgs library; fails on the
first kind of problem it meets, after reporting them all.

It fails (exit 1) when
  - a scenario or the flake does not evaluate;
  - a scenario's failed assertions or warnings differ from those it expects
    (scenarios/*.nix: expectAssertions, expectWarnings; none by default);
  - a unit's exposure (systemd-analyze security --offline) is above its limit
    in EXPOSURE_LIMITS;
  - a generated script would fail its real build (shellcheck for
    writeShellApplication, bash -n for the others);
  - a VM test's script fails pyflakes or mypy as the test driver runs them,
    or one of its nodes fails an assertion.
It exits 2, with one line, when something it needs is missing.

Usage (from anywhere):
    NIXPKGS_LIB=/path/to/nixpkgs.lib python3 tests/nixos/eval/check.py [--out DIR] [--details]
NIXPKGS_LIB is a checkout of github:nix-community/nixpkgs.lib (the folder
holding lib/). pyflakes and mypy must be importable by this Python:
    uv run --locked --with pyflakes python tests/nixos/eval/check.py
--out keeps the results (each scenario's JSON, unit files, scripts, test
scripts) in DIR; --details lists each unit's remaining exposures; --repo
evaluates another checkout of the project.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
# The checkout evaluated: this one, unless --repo names another.
THIS_REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))

import check_scripts  # noqa: E402
import check_tests  # noqa: E402
import score  # noqa: E402

# The highest `systemd-analyze security` exposure each unit may have, in
# every scenario that renders it. Units not named here are scored and shown.
EXPOSURE_LIMITS = {
    "msp-agent": 1.2,
    "msp-central": 1.1,
    # Root on purpose (the privileged half of the agent's work), sandboxed
    # to what the allow-listed actions need.
    "msp-l1@": 3.5,
}

TRACE = "trace: MSPSCRIPT "


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    scripts: list[str] = field(default_factory=list)  # MSPSCRIPT json lines

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print(f"   FAILED: {text}")


def one_line(text: str) -> str:
    return " ".join(text.split())


def nix_eval(args: list[str]) -> tuple[int, str, str]:
    r = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", *args],
        check=False,
        capture_output=True,
        text=True,
    )
    return r.returncode, r.stdout, r.stderr


def collect_traces(stderr: str, report: Report) -> str:
    """Keep the traced scripts; return stderr without them."""
    other = []
    for line in stderr.splitlines():
        if line.startswith(TRACE):
            report.scripts.append(line[len(TRACE) :])
        else:
            other.append(line)
    return "\n".join(other)


def expect(kind: str, got: list[str], expected: list[str], where: str, report: Report) -> None:
    """Every message must be expected, and every expectation met."""
    got = [one_line(m) for m in got]
    for message in got:
        print(f"   {kind}: {message}")
        if not any(e in message for e in expected):
            report.problem(f"{where}: unexpected {kind.lower()}: {message[:160]}")
    for e in expected:
        if not any(e in m for m in got):
            report.problem(f"{where}: expected {kind.lower()} did not fire: {e}")


def score_units(
    units: dict[str, str],
    drop_ins: dict[str, str],
    directory: pathlib.Path,
    details: bool,
    report: Report,
    where: str,
) -> None:
    """Score the project's units, and each template instance that has a
    drop-in as systemd reads it: the template, then the drop-in."""
    texts = {n: t for n, t in units.items() if n.startswith("msp")}
    for name, drop_in in drop_ins.items():
        template = name.split("@", 1)[0] + "@"
        if name.startswith("msp") and template in units:
            texts[name] = units[template] + "\n" + drop_in
    for name in sorted(texts):
        s = score.score_unit(name, texts[name], directory)
        limit = EXPOSURE_LIMITS.get(name.split("@", 1)[0] + "@" if "@" in name else name)
        bound = f"(limit {limit})" if limit is not None else "(no limit)"
        print(f"   {s.unit_file}: {s.verdict} {bound}")
        for line in s.warnings:
            # systemd-analyze older than the unit's systemd: shown, not fatal.
            print(f"      systemd-analyze: {line.split(': ', 1)[-1]}")
        if details:
            for weight, line in s.exposures:
                print(f"      {weight:4.1f}  {line}")
        if s.exposure is None:
            report.problem(f"{where}: {s.unit_file} was not scored: {s.verdict}")
        elif limit is not None and s.exposure > limit:
            report.problem(f"{where}: {s.unit_file} exposure {s.exposure} is above {limit}")


def run_scenario(
    path: pathlib.Path, nixlib: pathlib.Path, repo: pathlib.Path
) -> tuple[int, str, str]:
    return nix_eval(
        [
            str(HERE / "run-scenario.nix"),
            "--arg",
            "lib",
            f"import {nixlib}/lib",
            "--arg",
            "repo",
            str(repo),
            "--arg",
            "scenario",
            str(path),
        ]
    )


def check_scenarios(
    nixlib: pathlib.Path, repo: pathlib.Path, out: pathlib.Path, details: bool, report: Report
) -> None:
    paths = sorted((HERE / "scenarios").glob("*.nix"))
    if not paths:
        report.problem("no scenarios in scenarios/")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda p: run_scenario(p, nixlib, repo), paths))
    for path, (rc, stdout, stderr) in zip(paths, results, strict=True):
        name = path.stem
        errors = collect_traces(stderr, report)
        (out / f"{name}.err").write_text(errors)
        if rc != 0:
            print(f"== {name}: EVALUATION ERROR")
            for line in errors.splitlines()[:20]:
                print(f"   {line}")
            report.problem(f"scenario {name} does not evaluate")
            continue
        (out / f"{name}.json").write_text(stdout)
        data = json.loads(stdout)
        print(
            f"== {name}: evaluated; assertions failed: {len(data['assertionsFailed'])}; "
            f"warnings: {len(data['warnings'])}"
        )
        expect("ASSERTION", data["assertionsFailed"], data["expectedAssertions"], name, report)
        expect("WARNING", data["warnings"], data["expectedWarnings"], name, report)
        score_units(data["units"], data["dropIns"], out / "units" / name, details, report, name)


def check_flake(
    nixlib: pathlib.Path, repo: pathlib.Path, out: pathlib.Path, details: bool, report: Report
) -> None:
    print("== flake.nix outputs (mock nixpkgs input)")
    rc, stdout, stderr = nix_eval(
        [
            str(HERE / "flake-eval.nix"),
            "--arg",
            "lib",
            f"import {nixlib}/lib",
            "--arg",
            "repo",
            str(repo),
        ]
    )
    errors = collect_traces(stderr, report)
    (out / "flake.err").write_text(errors)
    if rc != 0:
        print("   EVALUATION ERROR")
        for line in errors.splitlines()[:20]:
            print(f"   {line}")
        report.problem("flake.nix does not evaluate")
        return
    (out / "flake.json").write_text(stdout)
    d: dict[str, Any] = json.loads(stdout)
    print("   inputs:", d["inputs"])
    print("   outputs:", d["outputNames"])
    print("   nixosModules:", d["nixosModules"])
    print("   checks:", json.dumps(d["checks"]))
    print("   iso:", d["iso"]["isoName"])
    for n, p in d["packages"]["x86_64-linux"].items():
        print(
            f"   package {n}: {p['builder']} pname={p['pname']} build-system={p['build-system']} "
            f"deps={p['dependencies']} main={p['meta'].get('mainProgram')}"
        )
    # nixos/fleet.nix ships example values and says so.
    expected_warnings = {
        "appliance": ["nixos/fleet.nix still holds example values"],
        "installer": [],
    }
    for n in ("appliance", "installer"):
        r = d[n]
        print(
            f"== nixosConfigurations.{n}: assertions failed {len(r['assertionsFailed'])}, "
            f"warnings {len(r['warnings'])}"
        )
        expect("ASSERTION", r["assertionsFailed"], [], f"nixosConfigurations.{n}", report)
        expect("WARNING", r["warnings"], expected_warnings[n], f"nixosConfigurations.{n}", report)
        score_units(
            r["units"],
            r["dropIns"],
            out / "units" / f"flake-{n}",
            details,
            report,
            f"nixosConfigurations.{n}",
        )
    for problem in check_tests.check(d["vmTests"], out / "vm-tests"):
        report.problem(problem)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, help="keep the results here")
    parser.add_argument("--details", action="store_true", help="list remaining exposures")
    parser.add_argument("--repo", type=pathlib.Path, help="evaluate this checkout instead")
    args = parser.parse_args()
    repo = args.repo.resolve() if args.repo else THIS_REPO

    nixlib_env = os.environ.get("NIXPKGS_LIB")
    if not nixlib_env:
        print(
            "check.py: NIXPKGS_LIB is not set (a checkout of nix-community/nixpkgs.lib)",
            file=sys.stderr,
        )
        return 2
    nixlib = pathlib.Path(nixlib_env).resolve()
    if not (nixlib / "lib" / "default.nix").is_file():
        print(f"check.py: NIXPKGS_LIB={nixlib_env} holds no lib/default.nix", file=sys.stderr)
        return 2
    for tool in ("nix-instantiate", "systemd-analyze", "shellcheck", "bash"):
        if shutil.which(tool) is None:
            print(f"check.py: {tool} is not installed", file=sys.stderr)
            return 2
    for module in ("pyflakes", "mypy"):
        if importlib.util.find_spec(module) is None:
            print(
                f"check.py: {module} is not importable by {sys.executable} "
                "(run it with `uv run --locked --with pyflakes python ...`)",
                file=sys.stderr,
            )
            return 2

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        return run(nixlib, repo, args.out, args.details)
    with tempfile.TemporaryDirectory(prefix="nixos-eval-") as scratch:
        return run(nixlib, repo, pathlib.Path(scratch), args.details)


def run(nixlib: pathlib.Path, repo: pathlib.Path, out: pathlib.Path, details: bool) -> int:
    """Every check; the results are written below ``out``."""
    report = Report()
    check_scenarios(nixlib, repo, out, details, report)
    check_flake(nixlib, repo, out, details, report)

    scripts_file = out / "scripts" / "all.jsonl"
    scripts_file.parent.mkdir(parents=True, exist_ok=True)
    scripts_file.write_text("".join(line + "\n" for line in report.scripts))
    for problem in check_scripts.check(check_scripts.load(scripts_file), out / "scripts"):
        report.problem(f"generated script would fail its build: {problem}")

    print()
    if report.problems:
        print(f"nixos-eval: {len(report.problems)} problem(s):")
        for p in report.problems:
            print(f"   {p}")
        return 1
    print("nixos-eval: all scenarios, the flake and the VM tests' scripts check out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
