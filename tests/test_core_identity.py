"""The DDPL core is the same text in every script, and so is the harness block (run folder, statistics, learning curve)
of every ddpl_*.py: compare the marked blocks across the repo root."""

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BEGIN = "# --- DDPL core: begin ---"
END = "# --- DDPL core: end ---"
HARNESS = ("# --- harness: begin ---", "# --- harness: end ---")


def core_files() -> list[Path]:
    """Every top-level ddpl_*.py, plus toy_failure_mode.py if present."""
    files = sorted(REPO_ROOT.glob("ddpl_*.py"))
    toy = REPO_ROOT / "toy_failure_mode.py"
    return files + [toy] if toy.exists() else files


def core_block(text: str, begin: str = BEGIN, end: str = END) -> str:
    """The text between the begin and end markers; exactly one of each, begin first."""
    n_begin, n_end = text.count(begin), text.count(end)
    if n_begin != 1 or n_end != 1:
        raise ValueError(f"expected one begin and one end marker, found {n_begin} and {n_end}")
    start, stop = text.index(begin) + len(begin), text.index(end)
    if stop < start:
        raise ValueError("the end marker comes before the begin marker")
    return text[start:stop]


def differing_blocks(texts: dict[str, str], markers: tuple[str, str] = (BEGIN, END)) -> list[str]:
    """Names whose marked block differs from the first one's (empty: all identical)."""
    blocks = {name: core_block(text, *markers) for name, text in texts.items()}
    reference = next(iter(blocks.values()))
    return [name for name, block in blocks.items() if block != reference]


def test_toy_failure_mode_carries_the_core():
    assert (REPO_ROOT / "toy_failure_mode.py") in core_files()
    assert "def sample_actions" in core_block((REPO_ROOT / "toy_failure_mode.py").read_text())


@pytest.mark.parametrize("path", core_files(), ids=lambda p: p.name)
def test_exactly_one_pair_of_markers(path):
    text = path.read_text()
    assert text.count(BEGIN) == 1, f"{path.name}: {text.count(BEGIN)} begin markers"
    assert text.count(END) == 1, f"{path.name}: {text.count(END)} end markers"
    assert text.index(BEGIN) < text.index(END), f"{path.name}: end marker before begin marker"


def test_core_blocks_identical():
    texts = {path.name: path.read_text() for path in core_files()}
    assert differing_blocks(texts) == [], f"DDPL core differs from {next(iter(texts))} in these files"


def harness_parts(text: str) -> list[str]:
    """The harness block cut into its top-level definitions (the first part keeps the block's header comment)."""
    return [part.strip("\n") for part in re.split(r"\n\n\n(?=def |class )", core_block(text, *HARNESS))]


def test_harness_blocks_identical():
    """ddpl_mpe.py's block is complete; every other script's is the same text with the parts it never calls left out:
    each part it keeps is identical, in the same order."""
    texts = {path.name: path.read_text() for path in sorted(REPO_ROOT.glob("ddpl_*.py"))}
    assert len(texts) == 5
    reference = harness_parts(texts["ddpl_mpe.py"])
    for name, text in texts.items():
        parts = harness_parts(text)
        assert parts[0] == reference[0] and any(p.startswith("class RunFolder") for p in parts), name
        assert [p for p in reference if p in parts] == parts, f"{name}: harness differs from ddpl_mpe.py's"
        for part in reference[1:]:  # a part left out must not be called, by the script or by a part it kept
            if part not in parts:
                called = re.match(r"(def|class) (\w+)", part).group(2)
                assert not re.search(rf"\b{called}\(", text), f"{name} calls {called} but left it out of its harness"
        assert len(parts) == len(set(parts)), name


def test_harness_parts_split_at_top_level_definitions():
    block = f"{HARNESS[0]}\n# header\ndef a():\n    def inner():\n        pass\n\n\nclass B:\n    pass\n{HARNESS[1]}\n"
    assert [p.split("\n")[0] for p in harness_parts(block)] == ["# header", "class B:"]


def test_helper_detects_one_character_change():
    body = "\ndef f(x):\n    return x + 1\n"
    a = f"header a\n{BEGIN}{body}{END}\nfooter a\n"
    b = f"header b, longer\n{BEGIN}{body}{END}\nother footer\n"
    c = f"{BEGIN}{body.replace('1', '2')}{END}\n"
    assert differing_blocks({"a": a, "b": b}) == []  # text outside the block may differ
    assert differing_blocks({"a": a, "b": b, "c": c}) == ["c"]
    assert differing_blocks({"a": a, "trailing space": a.replace("+ 1", "+ 1 ")}) == ["trailing space"]
    with pytest.raises(ValueError):
        core_block(a + BEGIN)
    with pytest.raises(ValueError):
        core_block(f"{END}\n{BEGIN}\n")
    with pytest.raises(ValueError):
        core_block("no markers at all")
