"""Lineage graph from meta.json hashes: recovery, ancestry, staleness, SVG and Mermaid output."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from slimforge.artifacts import write_meta
from tasks.evaluate.lineage import STALE, collect_lineage, lineage_mermaid, lineage_svg, node_label

SVG = "{http://www.w3.org/2000/svg}"


def _artifact(root: Path, rel: str, stage: str, method: str, parents: dict[str, Path], seed: int = 0) -> None:
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.safetensors").write_bytes(f"weights of {rel}".encode())
    write_meta(d, root=root, stage=stage, method=method, config={}, seed=seed, parents=parents)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """data file -> ingest -> train (+ a seed run) -> quantize/int4, finetune/{a,b} -> merge;
    prune from a user checkpoint outside the workspace. Parents are written before children."""
    root, outside = tmp_path / "ws", tmp_path / "outside"
    (root / "data").mkdir(parents=True)
    (root / "data" / "digits.npz").write_bytes(b"pixels")
    outside.mkdir()
    (outside / "user.safetensors").write_bytes(b"a user's checkpoint")
    a = root / "artifacts"
    _artifact(root, "artifacts/ingest", "ingest", "file", {"source": root / "data" / "digits.npz"})
    _artifact(root, "artifacts/train/seeds/seed-1", "train", "kaiming", {"dataset": a / "ingest"}, seed=1)
    _artifact(root, "artifacts/train", "train", "kaiming", {"dataset": a / "ingest"})
    _artifact(root, "artifacts/quantize/int4", "quantize", "rtn", {"base": a / "train", "calibration": a / "ingest"})
    for task in ("a", "b"):
        _artifact(root, f"artifacts/finetune/{task}", "finetune", "full", {"base": a / "train"})
    _artifact(root, "artifacts/merge", "merge", "ties", {"base": a / "train", "tasks": a / "finetune"})
    _artifact(root, "artifacts/prune", "prune", "magnitude", {"base": outside / "user.safetensors"})
    return root


def _triples(lineage) -> set[tuple[str, str, str]]:
    return {(e.parent, e.child, e.label) for e in lineage.edges}


def test_chain_is_recovered_with_edge_labels(ws: Path):
    lineage = collect_lineage(ws)
    user = (ws.parent / "outside" / "user.safetensors").resolve().as_posix()
    assert _triples(lineage) == {
        ("data/digits.npz", "artifacts/ingest", "source"),
        ("artifacts/ingest", "artifacts/train", "dataset"),
        ("artifacts/ingest", "artifacts/train/seeds/seed-1", "dataset"),
        ("artifacts/train", "artifacts/quantize/int4", "base"),
        ("artifacts/ingest", "artifacts/quantize/int4", "calibration"),
        ("artifacts/train", "artifacts/finetune/a", "base"),
        ("artifacts/train", "artifacts/finetune/b", "base"),
        ("artifacts/finetune/a", "artifacts/finetune", "a"),  # member edges of the directory
        ("artifacts/finetune/b", "artifacts/finetune", "b"),
        ("artifacts/train", "artifacts/merge", "base"),
        ("artifacts/finetune", "artifacts/merge", "tasks"),
        (user, "artifacts/prune", "base"),
    }
    kinds = {n: node["kind"] for n, node in lineage.nodes.items()}
    assert kinds["data/digits.npz"] == "file" and kinds[user] == "file"
    assert kinds["artifacts/finetune"] == "directory"
    assert kinds["artifacts/train/seeds/seed-1"] == kinds["artifacts/quantize/int4"] == "artifact"
    assert lineage.nodes["artifacts/quantize/int4"]["method"] == "rtn"
    assert lineage.nodes["artifacts/train/seeds/seed-1"]["seed"] == 1
    assert lineage.stale() == []


def test_ancestors_reach_the_dataset(ws: Path):
    lineage = collect_lineage(ws)
    assert lineage.ancestors("artifacts/quantize/int4") == ["artifacts/ingest", "artifacts/train", "data/digits.npz"]
    merge = lineage.ancestors("artifacts/merge")
    assert set(merge) == {"artifacts/finetune", "artifacts/finetune/a", "artifacts/finetune/b",
                          "artifacts/train", "artifacts/ingest", "data/digits.npz"}
    assert merge[-1] == "data/digits.npz"  # nearest first, the root last
    assert lineage.ancestors("data/digits.npz") == []
    with pytest.raises(KeyError, match="artifacts/merge"):
        lineage.ancestors("artifacts/nope")


@pytest.mark.parametrize("changed, stale_parent", [
    ("artifacts/train/model.safetensors", "artifacts/train"),
    ("data/digits.npz", "data/digits.npz"),
    ("artifacts/finetune/a/model.safetensors", "artifacts/finetune"),  # seen through the directory
])
def test_a_modified_parent_makes_exactly_its_outgoing_edges_stale(ws: Path, changed: str, stale_parent: str):
    (ws / changed).write_bytes(b"retrained")
    lineage = collect_lineage(ws)
    stale = lineage.stale()
    outgoing = [e for e in lineage.edges if e.parent == stale_parent and e.kind == "parent"]
    assert outgoing and sorted(stale, key=str) == sorted(outgoing, key=str)
    assert all("changed" in e.note and stale_parent in e.note for e in stale)


def test_a_missing_parent_is_stale_and_named(ws: Path):
    shutil.rmtree(ws.parent / "outside")
    lineage = collect_lineage(ws)
    user = (ws.parent / "outside" / "user.safetensors").resolve().as_posix()
    (edge,) = lineage.stale()
    assert (edge.parent, edge.child, edge.fresh) == (user, "artifacts/prune", False)
    assert f"{user}: no longer exists" in edge.note
    assert lineage.nodes[user]["kind"] == "missing" and lineage.nodes[user]["sha256"] is None
    assert 'class n' in lineage_mermaid(lineage) and "missing" in lineage_mermaid(lineage)


def test_temp_dirs_of_a_stage_in_flight_are_not_artifacts(ws: Path):
    shutil.copytree(ws / "artifacts" / "prune", ws / "artifacts" / ".prune.tmp-1234abcd")
    assert not any(".tmp-" in n for n in collect_lineage(ws).nodes)


def _boxes(svg: str) -> dict[str, float]:
    """node id -> x of its box, read back from the drawing (the tooltip's first line is the id)."""
    groups = ET.fromstring(svg).iter(f"{SVG}g")
    return {g.find(f"{SVG}title").text.split("\n")[0]: float(g.find(f"{SVG}rect").get("x")) for g in groups}


def test_svg_is_self_contained_xml_with_one_text_per_node(ws: Path):
    lineage = collect_lineage(ws)
    svg = lineage_svg(lineage)
    tree = ET.fromstring(svg)
    texts = [t for t in tree.iter(f"{SVG}text") if t.get("class") == "node"]
    assert len(texts) == len(lineage.nodes)
    shown = sorted(tuple(s.text for s in t.iter(f"{SVG}tspan")) for t in texts)
    assert shown == sorted(node_label(n, node) for n, node in lineage.nodes.items())
    assert "<script" not in svg and "href" not in svg and "<image" not in svg


def test_svg_edges_run_left_to_right_and_stale_ones_are_red(ws: Path):
    (ws / "artifacts" / "train" / "model.safetensors").write_bytes(b"retrained")
    lineage = collect_lineage(ws)
    svg = lineage_svg(lineage)
    x = _boxes(svg)
    assert set(x) == set(lineage.nodes)
    assert all(x[e.parent] < x[e.child] for e in lineage.edges)
    red = [p for p in ET.fromstring(svg).iter(f"{SVG}path") if p.get("stroke") == STALE]
    assert len(red) == len(lineage.stale()) == 4 and all(p.get("stroke-dasharray") for p in red)


def test_mermaid_names_every_node_once(ws: Path):
    (ws / "data" / "digits.npz").write_bytes(b"other pixels")
    lineage = collect_lineage(ws)
    text = lineage_mermaid(lineage)
    lines = text.splitlines()
    assert lines[:2] == ["```mermaid", "flowchart LR"] and lines[-1] == "```"
    defined = re.findall(r'^  (n\d+)\["(.*)"\]$', text, flags=re.MULTILINE)
    assert len(defined) == len({i for i, _ in defined}) == len(lineage.nodes)
    assert sorted(label for _, label in defined) == sorted(
        "<br/>".join(node_label(n, node)) for n, node in lineage.nodes.items())
    edges = [ln for ln in lines if re.match(r"^  n\d+ (-->|-\.->)\|", ln)]
    assert len(edges) == len(lineage.edges)
    assert [ln for ln in edges if "-.->" in ln] == [ln for ln in edges if "(stale)" in ln]
    assert sum("(stale)" in ln for ln in edges) == 1 and "linkStyle" in text


def test_a_file_inside_an_artifact_hangs_below_that_artifact(ws: Path):
    weights = ws / "artifacts" / "train" / "seeds" / "seed-1" / "model.safetensors"
    _artifact(ws, "artifacts/quantize/int8", "quantize", "rtn", {"base": weights})
    lineage = collect_lineage(ws)
    member = ("artifacts/train/seeds/seed-1", "artifacts/train/seeds/seed-1/model.safetensors", "model.safetensors")
    assert member in _triples(lineage)
    assert "artifacts/train/seeds/seed-1" in lineage.ancestors("artifacts/quantize/int8")
