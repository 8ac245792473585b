"""The CLI's printed examples: a command continued on the next line ends with a backslash."""

from fastunlearn.cli.app import EXAMPLES


def test_continued_example_lines_end_with_a_backslash():
    lines = EXAMPLES.splitlines()[1:]  # after "examples:"
    for i, line in enumerate(lines):
        # a lone backslash in the source joins two lines into one longer than a terminal line
        assert len(line) <= 120, f"example line {i + 1} is {len(line)} characters: two lines joined? {line}"
        if i + 1 < len(lines) and lines[i + 1].startswith("      "):  # the next line continues this command
            assert line.endswith(" \\"), f"example line {i + 1} continues on the next line without a backslash"
    assert sum(line.strip().startswith("torchrun") for line in lines) == 1
