"""The config key reference (gmd/configkeys.py, docs/CONFIG.md) against the parser.

The parser is the judge: every table whose keys it checks, and every key it
accepts there, must be in the registry with a description; every registered key
must parse; the documented defaults must be what the parser and the model do.
A failure says which key and where to document it.
"""

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
import tomli_w

from gmd import configkeys, configschema
from gmd.config import ConfigError, parse_config
from gmd.configkeys import NO_VALUE, example_table, walk
from gmd.configvalues import join_key
from tools.config_reference import REGENERATE, render

ROOT = Path(__file__).resolve().parents[2]
WHERE = (f"add a Key to the table in gmd/configkeys.py (type, default, description, example), "
         f"then run `{REGENERATE}`")
TABLES = dict(walk())


def parse(doc: dict):
    return parse_config(tomli_w.dumps(doc), file="reference.toml", base_dir=Path("/etc/gmd"))


def _place(path: str) -> str:
    """A checked table's dotted path with list indexes as ``[]``, as walk() names it."""
    return re.sub(r"\[\d+\]", "[]", path)


def test_every_key_the_parser_accepts_is_documented(monkeypatch):
    # Record what the parser itself allows in each table while it reads a
    # config holding every registered key (so it reaches every table).
    checked: dict[str, tuple[str, ...]] = {}
    original = configschema._Parser.check_keys

    def recording(self, table, key, allowed):
        checked[_place(key)] = tuple(allowed)
        return original(self, table, key, allowed)

    monkeypatch.setattr(configschema._Parser, "check_keys", recording)
    parse(example_table())
    for path, allowed in checked.items():
        assert path in TABLES, (f"gmd/configschema.py checks the keys of table {path or 'top level'!r}, "
                                f"which gmd/configkeys.py does not describe: add a Table for it, reached "
                                f"from its parent's Key, then run `{REGENERATE}`")
        documented = TABLES[path].names
        for name in allowed:
            assert name in documented, (f"{join_key(path, name)} is accepted by gmd/configschema.py but not "
                                        f"documented: {WHERE}")
    assert set(checked) == set(TABLES), f"tables never checked by the parser: {set(TABLES) - set(checked)}"


def test_every_registered_key_has_a_description_and_an_example():
    for path, table in TABLES.items():
        assert table.description.strip(), f"table {path or 'top level'} has no description"
        for key in table.all_keys:
            where = join_key(path, key.name)
            assert key.description.strip() and key.type.strip(), f"{where}: no description or type"
            assert key.required or key.default is not None or key.default_text, f"{where}: no default said"
            assert (key.example is None) == (key.table is not None), f"{where}: an example, or a table"


@pytest.mark.parametrize("path", sorted(TABLES))
def test_an_unregistered_key_is_refused_in_every_table(path):
    doc = example_table()
    target, where = doc, ""
    for part in re.findall(r'[^.\[\]]+|\[\]', path):  # walk down to the table at ``path``
        if part == "[]":
            target, where = target[0], where + "[0]"
        else:
            target, where = target[part], join_key(where, part)
    target["not_a_key"] = 1
    with pytest.raises(ConfigError) as info:
        parse(doc)
    assert info.value.key == join_key(where, "not_a_key")
    assert "expected one of: " + ", ".join(TABLES[path].names) in info.value.message


def test_every_choice_the_parser_accepts_is_explained():
    for path, table in TABLES.items():
        for key in table.all_keys:
            documented = [value for value, _ in key.values]
            for choice in key.choices:
                assert choice in documented, (f'{join_key(path, key.name)} accepts "{choice}" but gmd/configkeys.py '
                                              f"does not say what it does: add it to that Key's values, then run "
                                              f"`{REGENERATE}`")
            assert all(v in key.choices for v in documented), f"{join_key(path, key.name)}: documents a value " \
                                                              "the parser refuses"


def _model_object(config, path: str):
    """The parsed object for the (named) table at ``path``, or None for a list entry or tls."""
    obj, table = config, configkeys.TOP
    parts = path.split(".") if path else []
    while parts:
        key = table.key(parts.pop(0))
        if key.shape != "named" or key.model_attr is None:
            return None
        obj, table = getattr(obj, key.model_attr)[parts.pop(0)], key.table
    return obj


def _attr(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _documented_defaults():
    for path, table in TABLES.items():
        for key in table.all_keys:
            if key.table is None and key.model_attr and (key.default is not None or key.value is not NO_VALUE):
                yield path, table, key


PREREQUISITES = frozenset(k.requires for t in TABLES.values() for k in t.all_keys if k.requires)


def _parsed(path: str, key, written=NO_VALUE):
    """What the parser makes of ``key`` left out, or set to the TOML value ``written``,
    in a config of only required keys (and the keys it requires)."""
    doc = example_table(minimal=True, extra=PREREQUISITES if key.requires else frozenset())
    if written is not NO_VALUE:
        target = doc
        for part in path.split(".") if path else []:
            target = target[part]
        target[key.name] = tomllib.loads(f"v = {written}")["v"]
    return _attr(_model_object(parse(doc), path), key.model_attr)


def _documented(path: str, key):
    """The default the reference states, as the parser reads it."""
    return key.value if key.default is None else _parsed(path, key, key.default)


def test_documented_defaults_are_what_the_parser_does():
    seen = 0
    for path, _, key in _documented_defaults():
        got, documented = _parsed(path, key), _documented(path, key)
        assert got == documented, (f"{join_key(path, key.name)}: the reference says the default is "
                                   f"{key.default or key.default_text} ({documented!r}), the parser gives {got!r}")
        seen += 1
    assert seen > 30


def test_documented_defaults_match_the_model_dataclasses():
    placeholders = {t.placeholder for t in TABLES.values() if t.placeholder}
    compared = 0
    for path, table, key in _documented_defaults():
        if key.requires or table.model is None or any(p in (key.default or "") for p in placeholders):
            continue  # a default beside another key, or one made from the table's name: no dataclass has it
        first, _, rest = key.model_attr.partition(".")
        f = {f.name: f for f in dataclasses.fields(table.model)}[first]
        if f.default is dataclasses.MISSING:
            continue  # the parser always fills it
        model_default = _attr(f.default, rest) if rest else f.default
        documented = _documented(path, key)
        assert model_default == documented, (f"{join_key(path, key.name)}: gmd/configmodel.py's "
                                             f"{table.model.__name__}.{key.model_attr} defaults to {model_default!r}, "
                                             f"the reference to {documented!r}")
        compared += 1
    assert compared > 15


def test_docs_config_md_is_generated_from_the_registry():
    text = (ROOT / "docs" / "CONFIG.md").read_text()
    assert text == render(), f"docs/CONFIG.md is out of date: run `{REGENERATE}`"
