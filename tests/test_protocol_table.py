"""docs/method.md's protocol table names only options the config has: every `section.key` in it
is a config field, every `section.key=value` loads (and passes the evaluator's option checks),
and every one in the "fit3d default" column is the field's actual default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from fit3d.config import Config, load_config
from fit3d.eval.paper import check_options

DOC = Path(__file__).resolve().parent.parent / "docs" / "method.md"
OPTION = re.compile(r"`((?:eval|lift|finetune|scenes)\.[a-z0-9_]+)(?:=([^`]*))?`")


def _rows() -> list[dict[str, str]]:
    text = DOC.read_text()
    section = text.split("## Protocol table", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for ln in lines[2:]:  # after the |---| rule
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == len(header), ln
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _default(key: str):
    section, name = key.split(".")
    return getattr(getattr(Config(), section), name)


def test_the_table_has_a_row_per_knob_kind():
    rows = _rows()
    assert len(rows) >= 24
    kinds = {r["knob"].split(":")[0] for r in rows}
    for kind in ("dataset", "crop", "resize/pad", "heads", "augmentation", "schedule", "loss",
                 "metric"):  # fmt: skip
        assert kind in kinds
    assert all(r["original"] and r["set in"] for r in rows)


def test_every_option_the_table_names_exists_and_loads():
    named = 0
    for row in _rows():
        for column in ("fit3d default", "option"):
            for key, value in OPTION.findall(row[column]):
                section, name = key.split(".")
                fields = {f.name for f in dataclasses.fields(getattr(Config(), section))}
                assert name in fields, f"{key} (row {row['knob']!r}) is not a config field"
                named += 1
                if value:
                    cfg = load_config([], [f"{key}={value}"])  # type and known key
                    check_options(cfg.eval)
    assert named >= 30


@pytest.mark.parametrize("row", _rows(), ids=lambda r: r["knob"])
def test_defaults_in_the_table_are_the_configs(row):
    for key, value in OPTION.findall(row["fit3d default"]):
        if value:
            assert _default(key) == yaml.safe_load(value), f"{key}: table {value!r}"
