"""The repository's documents stand on their own and agree with the code.

Reads files only: no binary, no gateway, no network.

* ``etc/chatgw.yaml`` is the configuration reference. Every key the code accepts
  (``ConfigField.all`` in ``Sources/ChatConfig/ConfigFields.swift``) is in it with a comment
  line right above it, every key in it is accepted by the code, and the order is the
  code's (the Swift unit test ``shippedFileListsEveryKeyWithAComment`` asks that too).
* A config key that a document names in backticks (`` `limits.rate_per_s` ``) exists.
* Every relative link in README.md, BENCHMARKS.md, CONFORMANCE.md and docs/*.md resolves to
  a file or folder inside the repository, and its ``#anchor`` to a heading of the file it
  names (GitHub's heading slugs).
* Nothing refers to the folder outside the repository that the protocol and design
  documents were first kept in, and code, tests and top-level documents cite them by their
  place in the repository: ``docs/PROTOCOL.md``, ``docs/DESIGN.md``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILE = REPO_ROOT / "etc" / "chatgw.yaml"
CONFIG_FIELDS = REPO_ROOT / "Sources" / "ChatConfig" / "ConfigFields.swift"
LINKED_DOCUMENTS = ["README.md", "BENCHMARKS.md", "CONFORMANCE.md", "docs/*.md"]

KEY_RE = re.compile(r"^[a-z]+\.[a-z][a-z0-9_]*$")


# --------------------------------------------------------------------------- config keys


def _skip_swift_string(text: str, i: int) -> tuple[int, str]:
    """`text[i]` starts a string literal (`"..."`, `#"..."#`, `\"\"\"...\"\"\"`): returns the
    index after it and its source text between the delimiters (escapes and
    interpolations left as written)."""
    hashes = 0
    while text[i] == "#":
        hashes += 1
        i += 1
    quotes = '"""' if text.startswith('"""', i) and text[i + 3:i + 4] in ("\n", "\r") else '"'
    i += len(quotes)
    start = i
    close = quotes + "#" * hashes
    escape = "\\" + "#" * hashes
    while True:
        if text.startswith(close, i):
            return i + len(close), text[start:i]
        if text.startswith(escape, i):
            i += len(escape)
            if text[i] == "(":  # interpolation: code up to the matching parenthesis
                i = _skip_swift_code(text, i + 1, until=")")
            else:
                i += 1
            continue
        if quotes == '"' and text[i] == "\n":
            raise ValueError(f"unterminated string literal at offset {start}")
        i += 1


def _skip_swift_code(text: str, i: int, until: str) -> int:
    """Skips code (with nested brackets, strings and comments) up to and past the
    unmatched `until`."""
    closing = {"(": ")", "[": "]", "{": "}"}
    stack = [until]
    while stack:
        c = text[i]
        if text.startswith("//", i):
            i = text.index("\n", i)
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
        elif c == '"' or (c == "#" and re.match(r'#+"', text[i:])):
            i, _ = _skip_swift_string(text, i)
        elif c in closing:
            stack.append(closing[c])
            i += 1
        elif c in ")]}":
            if c != stack.pop():
                raise ValueError(f"unbalanced {c!r} at offset {i}")
            i += 1
        else:
            i += 1
    return i


def accepted_keys(fields_file: Path = CONFIG_FIELDS) -> list[str]:
    """The keys the code accepts, in order: the first string literal of every element of
    `static let all: [ConfigField] = [...]`, each element being `ConfigField("key", ...)`
    or `.int("key", ...)` and the like."""
    text = fields_file.read_text()
    declaration = re.search(r"static\s+let\s+all\s*:\s*\[\s*ConfigField\s*\]\s*=\s*\[", text)
    assert declaration, f"{fields_file}: no `static let all: [ConfigField] = [` (the list of accepted keys)"
    keys: list[str] = []
    i = declaration.end()
    element_key: str | None = None
    element_text = ""
    while True:
        c = text[i]
        if text.startswith("//", i):
            i = text.index("\n", i)
            continue
        if c == '"' or (c == "#" and re.match(r'#+"', text[i:])):
            i, literal = _skip_swift_string(text, i)
            element_text += '""'
            if element_key is None:
                element_key = literal
            continue
        if c in "([{":
            end = _skip_swift_code(text, i + 1, until={"(": ")", "[": "]", "{": "}"}[c])
            if element_key is None:
                inner = re.match(r'\(\s*(#*)"([^"\\]*)"\1', text[i:end])
                if inner:
                    element_key = inner.group(2)
            element_text += text[i:end]
            i = end
            continue
        if c in ",]":
            if element_text.strip():
                assert element_key and KEY_RE.match(element_key), (
                    f"{fields_file}: cannot read a key from the ConfigField.all element "
                    f"{element_text.strip()[:80]!r} (expected its first argument to be \"section.key\")")
                keys.append(element_key)
            element_key, element_text = None, ""
            if c == "]":
                break
            i += 1
            continue
        element_text += c
        i += 1
    assert len(keys) >= 10, f"{fields_file}: only {len(keys)} keys read from ConfigField.all; the parser is out of date"
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicated, f"{fields_file}: keys listed twice in ConfigField.all: {', '.join(duplicated)}"
    return keys


def documented_keys(config_file: Path = CONFIG_FILE) -> list[tuple[str, int, bool]]:
    """(section.key, line number, has a comment line right above it) for every key of the
    config file, in file order. The file is sections of `key: value` lines, two spaces in."""
    entries: list[tuple[str, int, bool]] = []
    section = None
    previous = ""
    for number, line in enumerate(config_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if line.startswith("#"):
            previous = line
            continue
        if not line.startswith(" "):
            match = re.fullmatch(r"([a-z][a-z0-9_]*):\s*(#.*)?", line)
            assert match, f"{config_file.name}:{number}: expected a section (`name:`), got {line!r}"
            section = match.group(1)
        elif line.strip().startswith("#"):
            pass
        else:
            match = re.fullmatch(r"  ([a-z][a-z0-9_]*):(\s.*)?", line)
            assert match and section, f"{config_file.name}:{number}: expected `  key: value` in a section, got {line!r}"
            entries.append((f"{section}.{match.group(1)}", number, previous.startswith("  # ")))
        previous = line
    return entries


def config_reference_problems(config_file: Path = CONFIG_FILE, fields_file: Path = CONFIG_FIELDS) -> list[str]:
    """What is wrong between the config file and the keys the code accepts, one line each."""
    code = accepted_keys(fields_file)
    entries = documented_keys(config_file)
    in_file = [key for key, _, _ in entries]
    name = config_file.relative_to(REPO_ROOT) if config_file.is_relative_to(REPO_ROOT) else config_file
    problems = [f"{key}: accepted by the code (ConfigField.all) but missing from {name}"
                for key in code if key not in in_file]
    problems += [f"{key}: in {name} (line {number}) but not accepted by the code (ConfigField.all)"
                 for key, number, _ in entries if key not in code]
    problems += [f"{key}: in {name} (line {number}) without a comment line right above it"
                 for key, number, commented in entries if not commented]
    problems += [f"{key}: listed twice in {name}" for key in sorted({k for k in in_file if in_file.count(k) > 1})]
    if not problems and in_file != code:
        first = next(index for index, (a, b) in enumerate(zip(in_file, code)) if a != b)
        problems.append(f"{name} lists the keys in another order than ConfigField.all: "
                        f"{in_file[first]} where the code has {code[first]}")
    return problems


def test_etc_chatgw_yaml_documents_exactly_the_keys_the_code_accepts():
    problems = config_reference_problems()
    assert not problems, "etc/chatgw.yaml and the code disagree:\n" + "\n".join(problems)


def test_documents_name_only_config_keys_that_exist():
    keys = set(accepted_keys())
    sections = {key.split(".")[0] for key in keys}
    unknown = []
    for path in _documents():
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for section, name in re.findall(r"`([a-z]+)\.([a-z][a-z0-9_]*)(?![\w./*])", line):
                if section in sections and f"{section}.{name}" not in keys:
                    unknown.append(f"{path.relative_to(REPO_ROOT)}:{number}: `{section}.{name}`")
    assert not unknown, "documents name config keys the code does not accept:\n" + "\n".join(unknown)


# --------------------------------------------------------------------------- links


def _documents() -> list[Path]:
    found: list[Path] = []
    for pattern in LINKED_DOCUMENTS:
        found += sorted(REPO_ROOT.glob(pattern))
    assert REPO_ROOT / "README.md" in found and REPO_ROOT / "docs/PROTOCOL.md" in found
    return found


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        marker = re.match(r"\s{0,3}(`{3,}|~{3,})", line)
        if marker:
            if fence is None:
                fence = marker.group(1)[0] * len(marker.group(1))
            elif marker.group(1).startswith(fence):
                fence = None
            continue
        if fence is None:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lower-cased, without punctuation but
    `-` and `_`, spaces as `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in _prose_lines(path):
        heading = re.match(r"\s{0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$", line)
        if heading:
            slug = github_slug(heading.group(1))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
        found.update(re.findall(r"""<a\s[^>]*(?:name|id)=["']([^"']+)["']""", line))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link, image, reference definition and HTML
    href/src outside code."""
    found = []
    for number, line in _prose_lines(path):
        prose = re.sub(r"(`+).*?\1", "", line)  # inline code is not a link
        found += [(number, target) for target in re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)", prose)]
        found += [(number, target) for target in re.findall(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", prose)]
        found += [(number, target) for target in re.findall(r"""(?:href|src)=["']([^"']+)["']""", prose)]
    return found


def link_problems(path: Path) -> list[str]:
    problems = []
    where = path.relative_to(REPO_ROOT)
    for number, target in links(path):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:|//", target):
            continue  # http:, https:, mailto: ...: not a file of this repository
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not resolved.is_relative_to(REPO_ROOT):
            problems.append(f"{where}:{number}: {target} points outside the repository")
            continue
        if not resolved.exists():
            problems.append(f"{where}:{number}: {target}: no such file in the repository")
            continue
        if anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
            problems.append(f"{where}:{number}: {target}: {resolved.relative_to(REPO_ROOT)} has no heading with the anchor #{anchor}")
    return problems


def test_every_relative_link_in_the_documents_resolves():
    problems = [problem for path in _documents() for problem in link_problems(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- references

# The outside folder is spelled in pieces, so that this file does not name it itself.
_OUTSIDE = "sha" + "red"
OUTSIDE_RE = re.compile(r"\.\./" + _OUTSIDE + r"\b|/work/" + _OUTSIDE + r"\b|(?<![\w./-])" + _OUTSIDE + r"/(?:PROTOCOL|DESIGN|STYLE)\.md")
BARE_CITATION_RE = re.compile(r"(?<![\w./-])(?:PROTOCOL|DESIGN)\.md")
SKIPPED_DIRS = {".git", ".swiftpm", "run", "bench", "__pycache__", ".pytest_cache", "artifacts", "node_modules"}
TEXT_SUFFIXES = {".md", ".swift", ".py", ".yaml", ".yml", ".sh", ".c", ".h", ".modulemap", ".txt", ".toml", ".json"}


def _repository_text_files() -> list[Path]:
    """Sources, tests, scripts, config and documents; not build output, run state or the
    benchmark results."""
    files = []
    for folder, subfolders, names in os.walk(REPO_ROOT):
        subfolders[:] = sorted(d for d in subfolders if d not in SKIPPED_DIRS and not d.startswith(".build"))
        top = Path(folder).relative_to(REPO_ROOT).parts[:1]
        for name in sorted(names):
            path = Path(folder) / name
            if path.suffix in TEXT_SUFFIXES or top in (("scripts",), (".ci",)):
                files.append(path)
    return files


def test_nothing_points_outside_the_repository_for_the_protocol_or_the_design():
    hits = []
    for path in _repository_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if OUTSIDE_RE.search(line):
                hits.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()[:120]}")
    assert not hits, "references to documents outside the repository (use docs/PROTOCOL.md, docs/DESIGN.md):\n" + "\n".join(hits)


def test_protocol_and_design_are_cited_by_their_place_in_the_repository():
    hits = []
    for path in _repository_text_files():
        if path.parent == REPO_ROOT / "docs":
            continue  # beside each other there, a bare name is the right relative reference
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if BARE_CITATION_RE.search(line):
                hits.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()[:120]}")
    assert not hits, "cite docs/PROTOCOL.md and docs/DESIGN.md by their path:\n" + "\n".join(hits)
