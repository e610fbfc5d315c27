"""The documentation stays true to the product: every link and anchor resolves, every command the
README shows names a real file, module or make target, the README stays short, no page tells the
project's history, and the reference pages name every matrix key and every results column."""

from __future__ import annotations

import configparser
import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
ALL = [README, REPO / "CONTRIBUTING.md", *PAGES]

README_MAX_LINES, README_MAX_WORDS = 200, 1800
FENCE = re.compile(r"^(```|~~~)(.*)$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# A commit hash: 7 to 40 hex digits with a letter and a digit, not part of a name (cell ids end
# in a hash after a dash and are fine).
HASH = re.compile(r"(?<![\w./-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w-])")
HISTORY = [re.compile(p, re.IGNORECASE) for p in
           (r"\bissues?\s*#?\d+", r"\bwas lent\b", r"\bleft to do\b", r"\btoday's\b", r"\bno GPU was\b")]


def _split(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Prose lines (code blocks blanked) and the fenced code blocks as (language, lines)."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        fence = FENCE.match(line.strip())
        if fence and block is None:
            block = (fence.group(2).strip(), [])
            prose.append("")
        elif fence and block is not None:
            blocks.append(block)
            block = None
            prose.append("")
        elif block is not None:
            block[1].append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


def _prose(text: str) -> str:
    """The text outside code blocks and code spans (links inside code are examples)."""
    return re.sub(r"`[^`\n]*`", "", "\n".join(_split(text)[0]))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-case, punctuation but `-` and `_`
    removed, spaces to dashes."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: Counter[str] = Counter()
    out = set()
    for line in _split(path.read_text())[0]:
        if m := HEADING.match(line):
            base = slug(m.group(2))
            out.add(f"{base}-{seen[base]}" if seen[base] else base)
            seen[base] += 1
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("doc", ALL, ids=_rel)
def test_every_relative_link_and_anchor_resolves(doc):
    broken = []
    for target in LINK.findall(_prose(doc.read_text())):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no {path}")
        elif anchor and dest.suffix != ".md":
            broken.append(f"{target}: an anchor into a file that is not a page")
        elif anchor and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {_rel(dest)}")
    assert not broken, f"{_rel(doc)}:\n" + "\n".join(broken)


def test_the_slug_rule_is_github_s():
    assert slug("The `plan:` section") == "the-plan-section"
    assert slug("Plan: the reference studies at full scale") == "plan-the-reference-studies-at-full-scale"
    assert slug("Kubernetes and AWS Batch") == "kubernetes-and-aws-batch"
    assert slug("lora_kernels, fast") == "lora_kernels-fast"


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):(?!=)", text, re.MULTILINE))


def _module_exists(name: str) -> bool:
    parts = name.split(".")
    base = REPO.joinpath(*parts)
    return base.with_suffix(".py").exists() or (base / "__main__.py").exists()


def _command_problems(line: str, targets: set[str]) -> list[str]:
    line = line.split(" #")[0].strip()
    if not line:
        return []
    words = line.split()
    head = words[0]
    problems = []
    if head == "make":
        problems += [f"make {t}: no such target" for t in words[1:] if "=" not in t and t not in targets]
    elif head in ("python", "python3", "torchrun", "deepspeed"):
        if "-m" in words or "--module" in words:
            i = words.index("-m") if "-m" in words else words.index("--module")
            if not _module_exists(words[i + 1]):
                problems.append(f"{line}: no module {words[i + 1]}")
        elif head.startswith("python") and not (REPO / words[1]).exists():
            problems.append(f"{line}: no file {words[1]}")
    elif head in (".", "source"):
        if words[1] != ".venv/bin/activate":
            problems.append(f"{line}: not the virtual environment make creates")
    elif head != "export":
        problems.append(f"{line}: a command this test does not know ({head}); teach it or label the block")
    for word in words[1:]:
        if re.match(r"^(configs|flows|steps|tests)/", word) and "<" not in word and not (REPO / word).exists():
            problems.append(f"{line}: no {word}")
    return problems


@pytest.mark.parametrize("doc", [README, REPO / "CONTRIBUTING.md"], ids=_rel)
def test_every_command_names_a_real_file_module_or_make_target(doc):
    """Blocks without a language (or `bash`) are commands; output is labelled `text`."""
    targets = _make_targets()
    problems = []
    for lang, lines in _split(doc.read_text())[1]:
        if lang in ("", "bash", "sh", "shell"):
            for line in lines:
                problems += _command_problems(line, targets)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", ALL, ids=_rel)
def test_code_in_every_page_names_real_modules_and_make_targets(doc):
    """What a reader would copy from a page: `python -m` modules and `make` targets."""
    targets = _make_targets()
    prose, blocks = _split(doc.read_text())
    commands = [line.strip() for _, lines in blocks for line in lines]
    commands += re.findall(r"`([^`\n]+)`", "\n".join(prose))
    commands = [c for c in commands if re.match(r"^(make|python3?|torchrun|deepspeed) ", c)]
    missing = [m for c in commands for m in re.findall(r"(?:python3?|torchrun.*|deepspeed.*) (?:-m|--module) ([\w.]+)", c)
               if not _module_exists(m)]
    missing += [f"make {t}" for c in commands for t in re.findall(r"^make ([a-z][\w-]*)", c) if t not in targets]
    assert not missing, f"{_rel(doc)}: {missing}"


def test_the_readme_is_short_and_answers_a_newcomer_in_order():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"{len(lines)} lines"
    assert len(text.split()) <= README_MAX_WORDS, f"{len(text.split())} words"
    headings = [m.group(2) for line in lines if (m := HEADING.match(line)) and len(m.group(1)) == 2]
    assert headings == ["What it does", "Quick start", "Your own study", "Reading the results",
                        "Documentation", "Development"]
    where = {h: next(i for i, line in enumerate(lines) if line == f"## {h}") for h in headings}
    assert where["Reading the results"] < 150  # the three questions answered in the first 150 lines
    # The two commands CI and new users run, exactly.
    _, blocks = _split(text)
    commands = [line for lang, block in blocks if lang == "" for line in block]
    assert "make run" in commands and "make test" in commands


def test_the_readme_lists_every_page_and_the_index_too():
    for index in (README, DOCS / "README.md"):
        linked = {(index.parent / t.partition("#")[0]).resolve() for t in LINK.findall(_prose(index.read_text()))}
        missing = [_rel(p) for p in PAGES if p != DOCS / "README.md" and p.resolve() not in linked]
        assert not missing, f"{_rel(index)} does not link {missing}"


@pytest.mark.parametrize("doc", ALL, ids=_rel)
def test_no_page_tells_the_project_s_history(doc):
    text = doc.read_text()
    found = [f"commit hash {h}" for h in HASH.findall(text)]
    found += [m.group(0) for pattern in HISTORY for m in pattern.finditer(text)]
    assert not found, f"{_rel(doc)}: {found}"


def test_the_history_checks_catch_what_they_are_for():
    assert HASH.findall("measured at c989a31 and d08c0412c053") == ["c989a31", "d08c0412c053"]
    assert not HASH.findall("llama-debug-lora-ddp-1x2-1204bf0c1c, 1234567, deadbeef, run 1796525628936565")
    assert all(p.search(s) for p, s in zip(HISTORY, ("as issue 26 asked", "no GPU was lent", "is left to do",
                                                      "today's trainer", "no GPU was available"), strict=True))


def test_the_glossary_defines_the_terms_the_pages_use():
    defined = anchors(DOCS / "glossary.md")
    for term in ("cell", "equivalence-class", "speed-cell", "quality-run", "study-twin", "room", "rank"):
        assert term in defined, term


def test_the_long_description_is_the_readme():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert cfg["metadata"]["long_description"] == "file: README.md"


def _schema_keys(model, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    from steps.plan.settings import _submodel

    out = []
    for name, field in model.model_fields.items():
        out.append(name)
        sub = _submodel(field.annotation)
        if sub is not None and issubclass(sub, BaseModel):
            out += _schema_keys(sub)
    return out


def test_the_matrix_page_names_every_key_of_the_matrix():
    from steps.plan.schema import MatrixSpec

    text = (DOCS / "matrix.md").read_text()
    missing = sorted({k for k in _schema_keys(MatrixSpec) if f"`{k}`" not in text})
    assert not missing, f"docs/matrix.md does not name {missing}"


def test_the_results_page_defines_every_column_and_metric():
    from steps.results import table
    from steps.results.metrics import FIELDS

    text = (DOCS / "results.md").read_text()
    columns = set(table.COLUMNS) | set(FIELDS) | {"matrix", "dp_size", "warmup_tokens_per_s", "train_steps",
                                                  "train_tokens"}
    missing = sorted(c for c in columns if f"`{c}`" not in text)
    assert not missing, f"docs/results.md does not define {missing}"


def test_the_results_page_names_every_report_section():
    from steps.report.sections import SECTIONS

    text = (DOCS / "results.md").read_text()
    missing = [s.title for s in SECTIONS if s.title.split(":")[0] not in text]
    assert not missing, missing


def _support_grid() -> dict[tuple[str, str], str]:
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | single |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    grid = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        grid.update({(cells[0], strategy): value for strategy, value in zip(header[1:], cells[1:], strict=True)})
    return grid


def test_the_readme_s_support_grid_is_what_the_matrix_refuses():
    """Each method x strategy cell of the grid against the refusals of a real expansion (a 7B
    preset on 8 A100s, so nothing but the pair itself can refuse it)."""
    from steps.plan.matrix import expand, parse_matrix
    from steps.plan.schema import PEFT_METHODS, STRATEGIES

    grid = _support_grid()
    assert {m for m, _ in grid} == set(PEFT_METHODS) and {s for _, s in grid} == set(STRATEGIES)
    for (method, strategy), value in grid.items():
        runs = {}
        for inner in ("pipeline", "tensor"):
            spec = parse_matrix({"name": "grid", "models": "llama-2-7b", "peft": method, "strategy": strategy,
                                 "instance": "p4d.24xlarge", "gpus": 4, "lr": 1e-4, "precision": "bf16-true",
                                 "train": {"parallel": {"hybrid_inner": inner}}})
            (cell,) = expand(spec)
            runs[inner] = cell.refused is None
        expected = {"yes": {"pipeline": True, "tensor": True}, "no": {"pipeline": False, "tensor": False},
                    "pipeline inner only": {"pipeline": True, "tensor": False}}[value]
        if strategy != "hybrid":
            expected = {"pipeline": expected["pipeline"], "tensor": expected["pipeline"]}
        assert runs == expected, (method, strategy, value, runs)


def test_every_whole_matrix_a_page_shows_is_valid():
    """A YAML block with a name, models, peft, strategy and lr is a matrix a reader may copy."""
    import yaml

    from steps.plan.matrix import parse_matrix

    checked = 0
    for doc in ALL:
        for lang, lines in _split(doc.read_text())[1]:
            data = yaml.safe_load("\n".join(lines)) if lang == "yaml" else None
            if isinstance(data, dict) and {"name", "models", "peft", "strategy", "lr"} <= set(data):
                parse_matrix(data, f"{_rel(doc)}: {data['name']}")
                checked += 1
    assert checked >= 2  # the README's study and the matrix page's first matrix at least
