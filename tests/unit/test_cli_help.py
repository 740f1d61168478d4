"""Every command's --help has examples, every example parses, completion covers every command.

The commands come from the real parser, so a command added without examples
fails here; the examples are read back from the help text a user sees.
"""

import argparse
import contextlib
import io
import re
import shlex

import pytest

from tools import cli


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


COMMANDS = _subcommands(cli.build_parser())
HAGEO = {"gmddirty": cli._hageo_parser("gmddirty", "dirty", "mark the source"),
         "gmdclean": cli._hageo_parser("gmdclean", "clean", "mark the target")}


def _examples(help_text: str) -> list[str]:
    """The command lines listed under "examples:" in a --help text."""
    section = help_text.split("\nexamples:\n", 1)
    if len(section) < 2:
        return []
    lines = []
    for line in section[1].split("\n\n", 1)[0].splitlines():
        if line.startswith("  ") and not line.startswith("      "):  # not a wrapped description
            lines.append(re.split(r"\s{2,}", line.strip())[0])
    return lines


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_help_shows_examples_of_that_command(name):
    examples = _examples(COMMANDS[name].format_help())
    assert any(e == f"gmd {name}" or e.startswith(f"gmd {name} ") for e in examples), (
        f"'gmd {name} --help' shows no example of 'gmd {name}': add some to EXAMPLES in tools/cli.py")


@pytest.mark.parametrize("prog", sorted(HAGEO))
def test_hageo_commands_help_shows_their_examples(prog):
    examples = _examples(HAGEO[prog].format_help())
    assert any(e.startswith(f"{prog} ") for e in examples), f"'{prog} --help' shows no example of {prog}"


def _all_examples() -> list[tuple[str, str]]:
    """(where it is shown, one command line) for every example in every --help."""
    shown = [("gmd --help", e) for e in _examples(cli.build_parser().format_help())]
    shown += [(f"gmd {name} --help", e) for name, p in COMMANDS.items() for e in _examples(p.format_help())]
    shown += [(f"{prog} --help", e) for prog, p in HAGEO.items() for e in _examples(p.format_help())]
    return shown


def test_top_level_help_lists_the_common_examples():
    examples = [e for where, e in _all_examples() if where == "gmd --help"]
    assert {"gmd demo", "gmd init appslv", "gmd status appslv --json"} <= set(examples)


@pytest.mark.parametrize(("where", "example"), _all_examples())
def test_every_example_parses(where, example):
    for command in example.split("&&"):
        words = shlex.split(command)
        for i, word in enumerate(words):  # a redirection is the shell's, not the command's
            if word in (">", ">>", "|"):
                words = words[:i]
                break
        prog, args = words[0], words[1:]
        parser = HAGEO[prog] if prog in HAGEO else cli.build_parser()
        assert prog in HAGEO or prog == "gmd", f"{where}: example {example!r} runs {prog!r}"
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(args)
        except SystemExit as e:
            assert e.code == 0, f"{where}: example {example!r} does not parse: {err.getvalue().strip().splitlines()[-1]}"


def test_completion_script_names_every_command(capsys):
    assert cli.main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    listed = re.search(r"^_shtab_gmd_subparsers=\((.*)\)$", script, re.M)
    assert listed and set(listed.group(1).split()) == set(COMMANDS)
    for name in COMMANDS:  # and each command's own options
        assert f"_shtab_gmd_{name.replace('-', '_')}_option_strings=(" in script, name
    for shell in ("zsh", "tcsh"):
        assert cli.main(["completion", shell]) == 0
        assert "test-failover" in capsys.readouterr().out


def test_completion_refuses_an_unknown_shell(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["completion", "fish"])
    assert info.value.code == 2
    assert "invalid choice: 'fish'" in capsys.readouterr().err
