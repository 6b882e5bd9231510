"""SPEC.md stays true: its tables match the records in code, and old caches keep opening."""

from __future__ import annotations

import dataclasses
import re
import types
from pathlib import Path
from typing import Literal, Union, get_args, get_origin, get_type_hints

import pytest
import torch

from vitscope.analysis.files import (
    FEATURES_SCHEMA,
    MS_SCHEMA,
    TOP_IMAGES_SCHEMA,
    AnalysisMeta,
    MonosemanticityMeta,
)
from vitscope.analysis.label_files import LABELS_SCHEMA, VOCABULARY_SCHEMA, LabelsMeta
from vitscope.cache_spec import CacheAttrs, ShardCommit, open_cache
from vitscope.cache_spec.layout import ROWS_SCHEMA, STORAGES
from vitscope.cache_spec.storage import ENCODINGS
from vitscope.saes.architectures import ARCHITECTURES, build_sae
from vitscope.saes.architectures.topk import TopKOptions
from vitscope.saes.card import SAECard

SPEC = Path(__file__).parents[1] / "cache_spec" / "SPEC.md"
SAE_FORMAT = Path(__file__).parents[1] / "saes" / "SAE_FORMAT.md"
ANALYSIS = Path(__file__).parents[1] / "analysis" / "ANALYSIS.md"
GOLDEN = Path(__file__).parent / "data"


def spec_table(heading: str, doc: Path = SPEC) -> list[list[str]]:
    """Rows (cells stripped of backticks) of the first table after a heading of a document."""
    text = doc.read_text()
    start = text.index(heading)
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip().strip("`") for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # header and rule


def spec_type(hint: object) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else spec_type(a) for a in get_args(hint))
    if get_origin(hint) is tuple:
        return f"list[{spec_type(get_args(hint)[0])}]"
    if get_origin(hint) is Literal:
        return "str"
    return hint.__name__  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("heading", "record"),
    [("### Cache attributes", CacheAttrs), ("### Commit records", ShardCommit)],
)
def test_record_tables_match_the_dataclasses(heading: str, record: type):
    hints = get_type_hints(record)
    documented = [(name, kind) for name, kind, _ in spec_table(heading)]
    in_code = [(f.name, spec_type(hints[f.name])) for f in dataclasses.fields(record)]
    assert documented == in_code


def test_sae_card_tables_match_the_card_and_every_architecture():
    hints = get_type_hints(SAECard)
    in_code = [(f.name, spec_type(hints[f.name])) for f in dataclasses.fields(SAECard)]
    in_code[in_code.index(("options", "Options"))] = ("architecture", "str")  # named, then flat
    documented = [(name, kind) for name, kind, _ in spec_table("## The card", SAE_FORMAT)]
    assert documented == in_code
    for name, sae_class in ARCHITECTURES.items():
        hints = get_type_hints(sae_class.Options)
        documented = [(f, kind) for f, kind, _ in spec_table(f"### `{name}`", SAE_FORMAT)]
        assert documented == [
            (f.name, spec_type(hints[f.name])) for f in dataclasses.fields(sae_class.Options)
        ]


def test_sae_weights_table_matches_what_training_saves():
    documented = {name: shape for name, shape, _ in spec_table("## The weights", SAE_FORMAT)}
    tensors = build_sae(SAECard(4, 6, TopKOptions(k=2))).state_dict()
    shapes = {"[F, D]": (6, 4), "[F]": (6,), "[D]": (4,), "[]": ()}
    assert {name: shapes[shape.rsplit(" ", 1)[0]] for name, shape in documented.items()} == {
        name: tuple(t.shape) for name, t in tensors.items()
    }


def test_analysis_tables_match_the_code():
    for heading, record in [
        ("## `meta.json`", AnalysisMeta),
        ("### `monosemanticity.json`", MonosemanticityMeta),
        ("### `labels.json`", LabelsMeta),
    ]:
        hints = get_type_hints(record)
        documented = [(name, kind) for name, kind, _ in spec_table(heading, ANALYSIS)]
        assert documented == [
            (f.name, spec_type(hints[f.name])) for f in dataclasses.fields(record)
        ]
    for heading, schema in [
        ("## `features.parquet`", FEATURES_SCHEMA),
        ("## `top_images.parquet`", TOP_IMAGES_SCHEMA),
        ("### `monosemanticity.parquet`", MS_SCHEMA),
        ("### `labels.parquet`", LABELS_SCHEMA),
        ("### `vocabulary.parquet`", VOCABULARY_SCHEMA),
    ]:
        documented = [(name, kind) for name, kind, _ in spec_table(heading, ANALYSIS)]
        assert documented == [(f.name, str(f.type)) for f in schema]


def test_row_table_columns_match_the_schema():
    documented = [(name, kind) for name, kind, _ in spec_table("`shards/<stem>.parquet` lists")]
    assert documented == [(f.name, str(f.type)) for f in ROWS_SCHEMA]


def test_storage_table_matches_the_encodings():
    rows = spec_table("dimension names (row, token, channel)")
    assert [r[0] for r in rows] == list(STORAGES)
    for name, zarr_dtype, size, _ in rows:
        assert zarr_dtype.split()[0] == ENCODINGS[name].zarr_dtype
        assert int(size) == ENCODINGS[name].bytes_per_value


def test_layer_names_in_the_tree_follow_layout():
    tree = re.search(r"```\nCACHE/\n(.*?)```", SPEC.read_text(), re.S)
    assert tree and "layer_02/" in tree.group(1) and "layer_02_scale/" in tree.group(1)


def test_a_cache_written_at_spec_1_0_still_opens():
    cache = open_cache(GOLDEN / "cache-v1.0", layer=2)
    assert cache.attrs.spec_version == "1.0" and cache.attrs.storage == "int8"
    assert cache.uncommitted_shards() == ["00001.tar"]
    assert [(c.first_row, c.n_rows) for c in cache.chunks()] == [(0, 2), (2, 1)]
    expected = torch.arange(60.0).reshape(3, 5, 4) * 3
    torch.testing.assert_close(
        cache.read_rows(2, [2, 0, 1]), expected[[2, 0, 1]], rtol=0, atol=177 / 254
    )
    table = cache.rows_table().to_pylist()
    assert [r["row"] for r in table] == [0, 1, None, 2]
    assert table[2]["error"] == "undecodable image: test"
