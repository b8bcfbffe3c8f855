"""What a reader, a user and --help meet: every script's --help states each default once, and no tracked file
mentions a repository file that does not exist (a clone alone explains everything it mentions)."""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterable

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


# ------------------------------------------------------------------------------------- dangling references
TEXT_SUFFIXES = (".py", ".md", ".sh", ".txt", ".json")  # tracked files that are read (plus .ci/run)
PATH_SUFFIXES = (".py", ".md", ".sh", ".json", ".txt", ".pt")  # a bare word ending so names a file
URL = re.compile(r"(?:https?://|www\.|github\.com/)\S+")
TOKEN = re.compile(r"[\w.~$<>{}\[\]*\-/]+")
PLACEHOLDER = re.compile(r"\$\{?\w+\}?|<[^<>/]*>|\{[^{}/]*\}|\*|\.\.\.")  # $x, <name>, {name}, *, ...
CAPS_STEM = re.compile(r"^[A-Z][A-Z_]+(\.\w+)?$")  # METHOD.py in usage text; not documents (README.md is one)
SECTION_REF = re.compile(r"\b(README|BENCHMARKS|docs/protocol)(?:\.md)?(?:'s)?(?:\s+section)?[\s,(]*\\?[\"']"
                         r"([A-Z][^\"'\\\n]{1,80})\\?[\"']")
MD_LINK = re.compile(r"\]\(([^)\s#]*)(#[^)\s]*)?\)")
# Files of other projects, or of the temporary trees tests build, that are named on purpose.
NOT_OURS = {
    "DATASETS.md": "CoOp's dataset guide, linked by its URL",
    "job.sh": "the SLURM job file `bash run.sh --help` tells the user to write",
    "methods/fake.py": "a stub method that tests/test_run_sh.py writes into its temporary project",
    "methods/other.py": "another stub of tests/test_run_sh.py's temporary project",
    "methods/nosuch.py": "the method tests/test_run_sh.py asks for to see it refused",
    "fake.py": "methods/fake.py, by its name", "other.py": "methods/other.py, by its name",
    "summary.md": "the table file `python eval.py summarize` writes into an output folder",
    "paper.md": "the comparison file `python eval.py summarize --paper` writes into an output folder",
}


def tracked_files() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def _pattern(name: str) -> re.Pattern:
    """A repository path with placeholders ($x, <x>, {x}, *, ..., and CAPS.py components) as a regex."""
    parts = []
    for part in name.rstrip("/").split("/"):
        if CAPS_STEM.match(part) and not part.endswith(".md"):
            parts.append("[^/]*" + re.escape(Path(part).suffix))
            continue
        pieces, last = [], 0
        for m in PLACEHOLDER.finditer(part):
            pieces += [re.escape(part[last:m.start()]), "[^/]*"]
            last = m.end()
        parts.append("".join(pieces) + re.escape(part[last:]))
    return re.compile("/".join(parts) + "/?")


def mentioned_files(text: str, top_level: set[str]) -> list[str]:
    """Words of `text` that name a file or folder of this repository: paths beginning with a top-level entry,
    any path to a .md file, bare names of .md/.py/.sh files, and anything starting with ../ (which leaves
    the repository). Not: URLs, ~/..., $VAR/..., absolute paths (the user's machine), other relative paths
    (datasets, outputs, model names such as ViT-B/16), bare data or output file names (results.json)."""
    found = []
    for m in TOKEN.finditer(URL.sub(" ", text)):
        word = m.group().rstrip(".,:;-")
        word = word[2:] if word.startswith("./") else word
        if word.startswith("../"):
            found.append(word)
        elif not word or word[0] in "~$/" or word in NOT_OURS or Path(word).name in NOT_OURS and \
                word.split("/")[0] not in top_level:
            continue
        elif "/" in word:
            if word.split("/")[0] in top_level or word.endswith(".md"):
                found.append(word)
        elif word.endswith((".md", ".py", ".sh")) and PLACEHOLDER.sub("", word) not in ("", ".md", ".py", ".sh"):
            found.append(word)
    return found


def headings(markdown: str) -> list[str]:
    """The Markdown headings of a document, outside fenced code blocks, without their #s."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            out.append(line.lstrip("#").strip())
    return out


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def dangling(text: str, files: Iterable[str], where: str = "", read=None) -> list[str]:
    """What `text` (the contents of tracked file `where`) mentions that this repository does not have: files,
    sections of its documents ("README section 'X'", README's "X") and Markdown link anchors (#x). `files`:
    the repository's files (repository-relative); `read(path)`: a document's text (for sections)."""
    files = list(files)
    top_level = {f.split("/")[0] for f in files}
    folders = {"/".join(f.split("/")[:i]) for f in files for i in range(1, f.count("/") + 1)}
    names = {Path(f).name for f in files}
    read = read or (lambda path: (ROOT / path).read_text(encoding="utf-8"))
    missing = []
    for word in mentioned_files(text, top_level):
        pattern = _pattern(word)
        pool = names if "/" not in word else [*files, *folders]
        if word.startswith("../") or not any(pattern.fullmatch(f) for f in pool):
            missing.append(word)
    documents = {"README": "README.md", "BENCHMARKS": "BENCHMARKS.md", "docs/protocol": "docs/protocol.md"}
    for m in SECTION_REF.finditer(text):
        doc, title = documents[m.group(1)], m.group(2).strip()
        if doc not in files or not any(h.startswith(title) for h in headings(read(doc))):
            missing.append(f'{doc} section "{title}"')
    if where.endswith(".md"):
        for m in MD_LINK.finditer(text):
            target, fragment = m.group(1), m.group(2)
            doc = str(Path(where).parent / target) if target else where
            doc = os.path.normpath(doc)
            if target and target.startswith(("http:", "https:", "mailto:")):
                continue
            if target and doc not in files and doc not in folders:
                missing.append(target)
            elif fragment and doc.endswith(".md") and doc in files and \
                    fragment[1:] not in {anchor(h) for h in headings(read(doc))}:
                missing.append(f"{target or where}{fragment}")
    return missing


def test_no_tracked_file_mentions_a_missing_file():
    files = tracked_files()
    problems = []
    for path in files:
        if path == "tests/test_repo.py":
            continue  # its examples name missing files on purpose; the tests below check the checker on them
        if path.endswith(TEXT_SUFFIXES) or path == ".ci/run":
            text = (ROOT / path).read_text(encoding="utf-8", errors="replace")
            problems += [f"{path}: {m}" for m in dangling(text, files, path)]
    assert not problems, "mentions of what the repository does not have:\n" + "\n".join(problems)


FAKE_TREE = ["README.md", "docs/protocol.md", "methods/coop.py", "data.py", "tests/test_x.py", "assets/m.pt"]
FAKE_DOCS = {"README.md": "# Tool\n\n## Datasets\n\n```\n# not a heading\n```\n\n## Speed (CPU)\n",
             "docs/protocol.md": "# Protocol\n\n## The base-to-novel split\n"}


@pytest.mark.parametrize("text", [
    "see NOTES.md", "details in docs/nothing.md", "as notes/recipe.md says", "from ../elsewhere/table.md",
    "run `methods/kgcoop.py`", "the weights in assets/other.pt", "python tests/test_y.py", "see notes.py",
    "see README.md section 'Outputs'", 'README\'s "Not here" section', "[link](docs/nothing.md)",
    "[link](docs/protocol.md#no-such-heading)", "[link](#not-a-heading)", "(README, \"Not a heading\")",
])
def test_checker_finds_what_is_missing(text):
    assert dangling(text, FAKE_TREE, "README.md", FAKE_DOCS.get), text


@pytest.mark.parametrize("text", [
    "methods/coop.py and data.py", "`methods/<m>.py`, methods/$method.py, methods/{name}.py, methods/*.py",
    "methods/METHOD.py", "coop.py", "tests/", "assets/m.pt.", "output/demo/results.json", "~/.cache/clip/x.pt",
    "$DATA/dtd/split_zhou_DescribableTextures.json", "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md",
    "CoOp's DATASETS.md", "ViT-B/16 and base/novel", "results.json, classnames.txt, prompt.pt", "/path/to/data",
    "README.md section 'Datasets'", 'README\'s "Speed" section', "[protocol](docs/protocol.md)",
    "[split](docs/protocol.md#the-base-to-novel-split)", "[speed](#speed-cpu)",
])
def test_checker_accepts_what_is_there_or_not_ours(text):
    assert dangling(text, FAKE_TREE, "README.md", FAKE_DOCS.get) == [], text


# ------------------------------------------------------------------------- docs/protocol.md against the code
def markdown_table(text: str, header_start: str) -> list[list[str]]:
    """The rows (cells stripped, backticks removed) of the Markdown table whose header begins `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip().strip("|").split("|")])
    return rows


PROTOCOL = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")


def test_protocol_recipes_are_the_scripts_defaults():
    rows = markdown_table(PROTOCOL, "| method | paper | epochs |")
    assert sorted(r[0] for r in rows) == sorted(m for m in METHODS if m != "zeroshot")
    for method, _, epochs, batch, lr, n_ctx, *_ in rows:
        args = load_method(method).parse_args([])
        assert (args.epochs, args.batch_size, args.lr, args.n_ctx) == (int(epochs), int(batch), float(lr), int(n_ctx)), method
        assert (args.warmup_lr, args.momentum, args.weight_decay, args.shots) == (1e-5, 0.9, 5e-4, 16), method


def test_protocol_templates_are_data_py_s():
    import data
    rows = markdown_table(PROTOCOL, "| dataset | classes | coop |")
    assert [r[0] for r in rows] == [k for k in data.DATASETS if not k.startswith("demo_")]
    for key, classes, *columns in rows:
        assert (int(classes), tuple(columns)) == (data.DATASETS[key].n_classes, data.DATASETS[key].templates), key


def test_protocol_checkpoints_and_metrics_are_the_code_s():
    import inspect

    import clip
    import eval as evaluation
    rows = markdown_table(PROTOCOL, "| model | SHA256 |")
    assert {model: sha for model, sha in rows} == clip.clip._SHA256
    assert all(sha in url for sha, url in zip(clip.clip._SHA256.values(), clip.MODELS.values()))
    assert "https://openaipublic.azureedge.net/clip/models/<sha256>/" in PROTOCOL and clip.clip._BASE_URL in PROTOCOL
    assert inspect.signature(evaluation.calibration_errors).parameters["n_bins"].default == 10
    assert inspect.signature(evaluation.compute_metrics).parameters["n_bins"].default == 10
    assert "**10 equal-width bins**" in PROTOCOL and "K = 5" in PROTOCOL and "[0.01, 100]" in PROTOCOL
    fit = inspect.signature(evaluation.fit_temperature).parameters
    assert (fit["t_min"].default, fit["t_max"].default) == (0.01, 100.0)
    dac = inspect.signature(evaluation.dac_factors).parameters
    assert (dac["k"].default, dac["base_threshold"].default) == (5, 0.05)
