"""What a reader, a user and --help meet: every script's --help states each default once, and no tracked file
mentions a repository file that does not exist (a clone alone explains everything it mentions)."""
import argparse
import subprocess
import sys

import pytest

from conftest import ROOT
from test_coop import load_method

METHODS = sorted(p.stem for p in (ROOT / "methods").glob("*.py") if not p.stem.startswith("_"))


# ------------------------------------------------------------------------------------------------ --help
def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and, recursively, those of its subcommands."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def script_parsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    """{script: its parser}, each built in-process by the script's own code (parse_args or main), which is stopped
    at the moment it would parse."""
    built = []

    def capture(self, args=None, namespace=None):
        built.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    entry_points = {f"methods/{m}.py": load_method(m).parse_args for m in METHODS}
    import demo
    import eval as evaluation
    sys.path.insert(0, str(ROOT / "tests"))
    import bench
    entry_points.update({"eval.py": evaluation.main, "demo.py": demo.main, "tests/bench.py": bench.parse_args})
    parsers = {}
    for script, entry in entry_points.items():
        built.clear()
        with pytest.raises(SystemExit):
            entry([])
        parsers[script] = built[0]
    return parsers


def test_every_option_states_its_default_once(monkeypatch):
    parsers = script_parsers(monkeypatch)
    assert len(parsers) == len(METHODS) + 3
    problems = []
    for script, top in parsers.items():
        for parser in _parsers(top):
            formatter = parser._get_formatter()
            for action in parser._actions:
                if not action.help or action.help == argparse.SUPPRESS:
                    continue
                text = formatter._expand_help(action)  # the option's help exactly as --help prints it
                name = "/".join(action.option_strings) or action.dest
                if text.lower().count("default") > 1:
                    problems.append(f"{parser.prog} {name}: default stated twice: {text!r}")
                if "(default: None)" in text or "(default: [" in text:
                    problems.append(f"{parser.prog} {name}: {text!r}")
            assert "(default: None)" not in parser.format_help(), parser.prog
    assert not problems, "\n".join(problems)


def test_help_states_defaults_including_zero(monkeypatch):
    parsers = script_parsers(monkeypatch)
    coop = parsers["methods/coop.py"].format_help()
    assert "(default: 16)" in coop and "(default: 200)" in coop  # --shots, --epochs
    assert "(default: 0)" in " ".join(coop.split())  # --feature-cache's 0 is a default worth stating
    demo_pretrain = next(p for p in _parsers(parsers["demo.py"]) if p.prog.endswith(" pretrain"))
    assert "(default: 1600" in " ".join(demo_pretrain.format_help().split())
    zeroshot = next(p for p in _parsers(parsers["demo.py"]) if p.prog.endswith(" zeroshot"))
    assert [a.dest for a in zeroshot._actions] == ["help", "root", "probe"]  # --probe on zeroshot alone
    others = [p for p in _parsers(parsers["demo.py"]) if not p.prog.endswith(" zeroshot")]
    assert not any("probe" in (a.dest for a in p._actions) for p in others)


def test_help_from_the_command_line():
    proc = subprocess.run([sys.executable, "methods/coop.py", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "training images per class (default: 16)" in " ".join(proc.stdout.split())
