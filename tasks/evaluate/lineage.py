"""The lineage graph of every artifact, read back from the meta.json files (DESIGN rule 4).

Each artifact directory records its parents by path and content hash (``write_meta``); this
module turns those records into a DAG, checks every recorded hash against the parent's
current content (a mismatch is a stale edge: the child was built from something that has
since changed) and draws the graph as a self-contained SVG and as a Mermaid flowchart.

Nodes are keyed by their path relative to the workspace root (absolute for a parent outside
it). Besides artifacts there are parents that are not artifacts: a dataset file, a user's
checkpoint, or a directory of artifacts such as ``artifacts/finetune`` (merge's parent). Such a
directory is linked to the artifacts inside it by ``member`` edges (member -> directory), and a
file inside an artifact by a ``member`` edge from that artifact, so ancestors reach the roots.
"""

from __future__ import annotations

import html
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from slimforge.artifacts import META, content_hash, read_meta


@dataclass(frozen=True)
class Edge:
    """parent -> child. ``kind`` is "parent" (recorded in the child's meta.json) or "member"
    (structural: an artifact inside a directory that is itself a recorded parent)."""

    parent: str
    child: str
    label: str
    fresh: bool
    note: str = ""
    kind: str = "parent"


@dataclass
class Lineage:
    nodes: dict[str, dict]
    edges: list[Edge] = field(default_factory=list)

    def ancestors(self, node_id: str) -> list[str]:
        """Every node upstream of ``node_id``, nearest first, back to the roots."""
        if node_id not in self.nodes:
            raise KeyError(f"{node_id!r} is not in the lineage; nodes: {', '.join(sorted(self.nodes))}")
        incoming = self._incoming()
        seen, frontier, out = {node_id}, [node_id], []
        while frontier:
            nxt = sorted({p for n in frontier for p in incoming[n]} - seen)
            seen.update(nxt)
            out += nxt
            frontier = nxt
        return out

    def stale(self) -> list[Edge]:
        """Edges whose parent changed (or vanished) since the child recorded its hash."""
        return [e for e in self.edges if not e.fresh]

    def layers(self) -> dict[str, int]:
        """Longest-path layering: roots are 0, every other node one past its deepest parent."""
        incoming, layer, active = self._incoming(), {}, set()

        def visit(n: str) -> int:
            if n not in layer:
                active.add(n)  # a cycle (which meta files should never make) is cut here
                layer[n] = 1 + max((visit(p) for p in incoming[n] if p not in active), default=-1)
                active.discard(n)
            return layer[n]

        for n in sorted(self.nodes):
            visit(n)
        return layer

    def _incoming(self) -> dict[str, list[str]]:
        incoming = defaultdict(list)
        for e in self.edges:
            incoming[e.child].append(e.parent)
        return incoming


def collect_lineage(root: Path) -> Lineage:
    """Walk ``root/artifacts/**/meta.json`` (read-only) into a Lineage with freshness checked."""
    root = Path(root).resolve()
    metas = {d.relative_to(root).as_posix(): read_meta(d) for d in _artifact_dirs(root / "artifacts")}
    nodes = {i: _artifact_node(root / i, m) for i, m in metas.items()}
    edges = []
    for child, meta in sorted(metas.items()):
        for name, record in sorted(meta.get("parents", {}).items()):
            pid = record["path"]
            if pid not in nodes:
                nodes[pid] = _other_node(root / pid)  # root / an absolute path is that path
            edges.append(_parent_edge(pid, child, name, record.get("sha256"), nodes[pid]))
    edges += _member_edges(nodes)
    return Lineage(nodes, edges)


def _artifact_dirs(artifacts: Path) -> list[Path]:
    """Directories holding a meta.json, skipping in-flight temp dirs (``.<name>.tmp-*``)."""
    found = [m.parent for m in artifacts.rglob(META)]
    return sorted(d for d in found if not any(p.startswith(".") for p in d.relative_to(artifacts).parts))


def _artifact_node(directory: Path, meta: dict) -> dict:
    return {"kind": "artifact", "stage": meta.get("stage"), "method": meta.get("method"),
            "seed": meta.get("seed"), "code_version": meta.get("code_version"),
            "sha256": content_hash(directory)}


def _other_node(path: Path) -> dict:
    """A parent that is no artifact of its own: a file, a directory, or something now gone."""
    kind = "missing" if not path.exists() else "directory" if path.is_dir() else "file"
    return {"kind": kind, "stage": None, "method": None, "seed": None, "code_version": None,
            "sha256": None if kind == "missing" else content_hash(path)}


def _parent_edge(pid: str, child: str, name: str, recorded: str | None, parent: dict) -> Edge:
    if parent["kind"] == "missing":
        return Edge(pid, child, name, False, f"{pid}: no longer exists (recorded by {child} as {name!r})")
    if parent["sha256"] != recorded:
        return Edge(pid, child, name, False, f"{pid}: content changed since {child} recorded it "
                    f"(recorded {str(recorded)[:12]}, now {parent['sha256'][:12]})")
    return Edge(pid, child, name, True)


def _member_edges(nodes: dict[str, dict]) -> list[Edge]:
    """Link a non-artifact directory to the outermost artifacts inside it (member -> dir), and a
    non-artifact path inside an artifact to the innermost artifact holding it (artifact -> path)."""
    artifacts = sorted(i for i, n in nodes.items() if n["kind"] == "artifact")
    edges = []
    for nid, node in sorted(nodes.items()):
        if node["kind"] == "artifact" or Path(nid).is_absolute():
            continue
        inside = [a for a in artifacts if _under(a, nid)]
        outer = [a for a in inside if not any(_under(a, b) for b in inside)]
        edges += [Edge(a, nid, a[len(nid) + 1:], True, kind="member") for a in outer]
        holders = [a for a in artifacts if _under(nid, a)]
        if not outer and holders:
            holder = max(holders, key=len)
            edges.append(Edge(holder, nid, nid[len(holder) + 1:], True, kind="member"))
    return edges


def _under(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


# ---- drawing -------------------------------------------------------------------------------

BOX_W, BOX_H, LANE_H, GAP_X, GAP_Y, PAD, LABEL_CHARS = 210, 44, 6, 80, 14, 20, 32
FILL = {"ingest": "#e3f2fd", "select": "#e8f5e9", "train": "#fff3e0", "finetune": "#f3e5f5",
        "prune": "#fce4ec", "quantize": "#e0f7fa", "merge": "#fffde7", "evaluate": "#ede7f6"}
STALE, EDGE = "#d32f2f", "#78909c"


def node_label(node_id: str, node: dict) -> tuple[str, str]:
    """(first line, second line): "stage/method" (or the kind) and the short path."""
    head = f"{node['stage']}/{node['method']}" if node["kind"] == "artifact" else node["kind"]
    short = node_id.removeprefix("artifacts/")
    if Path(node_id).is_absolute():
        short = "…/" + "/".join(Path(node_id).parts[-2:])
    return _clip(head), _clip(short)


def _clip(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def _chain(e: Edge, layer: dict[str, int]) -> list[tuple]:
    """The slots an edge passes: its parent, a lane per layer it skips, its child. A parent's
    lanes are shared by all its long edges, so they run as one bus between the boxes rather
    than under them."""
    skipped = range(layer[e.parent] + 1, layer[e.child])
    return [("node", e.parent), *(("lane", e.parent, k) for k in skipped), ("node", e.child)]


def _layout(lineage: Lineage) -> tuple[dict[str, int], dict[tuple, float]]:
    """(layer of each node, vertical centre of each slot): a column per layer; within a column
    slots are ordered by the mean height of what feeds them, and columns are centred."""
    layer = lineage.layers()
    feeds: dict[int, dict[tuple, list[tuple]]] = defaultdict(dict)
    for n in lineage.nodes:
        feeds[layer[n]][("node", n)] = []
    for e in lineage.edges:
        chain = _chain(e, layer)
        for a, b in pairwise(chain):
            feeds[layer[b[1]] if b[0] == "node" else b[2]].setdefault(b, []).append(a)
    size = {k: sum(BOX_H if s[0] == "node" else LANE_H for s in col) + GAP_Y * (len(col) - 1)
            for k, col in feeds.items()}
    centre: dict[tuple, float] = {}
    def bary(sources: list[tuple]) -> float:
        ys = [centre[p] for p in sources if p in centre]
        return sum(ys) / len(ys) if ys else 0.0

    for k in sorted(feeds):
        y = PAD + (max(size.values()) - size[k]) / 2
        for slot in sorted(feeds[k], key=lambda s: (bary(feeds[k][s]), s[0] == "lane", str(s[1]))):
            h = BOX_H if slot[0] == "node" else LANE_H
            centre[slot], y = y + h / 2, y + h + GAP_Y
    return layer, centre


def _column_x(k: int) -> float:
    return PAD + k * (BOX_W + GAP_X)


def _svg_edge(e: Edge, layer: dict[str, int], centre: dict[tuple, float]) -> str:
    """A smooth path: curves between columns, straight through each lane it rides."""
    chain = _chain(e, layer)
    pts = [(_column_x(layer[e.parent]) + BOX_W, centre[chain[0]])]
    for lane in chain[1:-1]:
        pts += [(_column_x(lane[2]), centre[lane]), (_column_x(lane[2]) + BOX_W, centre[lane])]
    pts.append((_column_x(layer[e.child]) - 2, centre[chain[-1]]))
    d = f"M{pts[0][0]:.0f},{pts[0][1]:.1f}"
    for j, ((x1, y1), (x2, y2)) in enumerate(pairwise(pts)):
        mx = (x1 + x2) / 2
        d += f" L{x2:.0f},{y2:.1f}" if j % 2 else f" C{mx:.0f},{y1:.1f} {mx:.0f},{y2:.1f} {x2:.0f},{y2:.1f}"
    style = (f'stroke="{STALE}" stroke-width="1.6" stroke-dasharray="6 4" marker-end="url(#stale)"'
             if not e.fresh else f'stroke="{EDGE}" stroke-width="1.1" marker-end="url(#arrow)"')
    title = f"{e.label}: {e.parent} → {e.child}" + (f" — STALE: {e.note}" if not e.fresh else "")
    return f'<path d="{d}" fill="none" {style}><title>{html.escape(title)}</title></path>'


def _svg_node(nid: str, node: dict, x: float, y: float) -> str:
    head, short = (html.escape(s) for s in node_label(nid, node))
    missing = node["kind"] == "missing"
    fill = "#ffebee" if missing else FILL.get(node["stage"], "#eeeeee")
    stroke = f'stroke="{STALE}" stroke-dasharray="4 3"' if missing else 'stroke="#546e7a"'
    tip = html.escape(f"{nid}\nsha256 {str(node['sha256'])[:16]}\ncode {node['code_version']}  seed {node['seed']}")
    cx = x + BOX_W / 2
    return (f'<g><title>{tip}</title><rect x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" height="{BOX_H}" '
            f'rx="8" fill="{fill}" {stroke}/><text class="node" x="{cx:.0f}" y="{y + 18:.0f}" '
            f'text-anchor="middle"><tspan x="{cx:.0f}" font-weight="bold">{head}</tspan>'
            f'<tspan x="{cx:.0f}" dy="15" font-size="11" fill="#455a64">{short}</tspan></text></g>')


def lineage_svg(lineage: Lineage) -> str:
    """The DAG left to right by layers, as one self-contained SVG document (no scripts, no
    external references); stale edges dashed red, with the reason in their tooltip."""
    layer, centre = _layout(lineage)
    width = _column_x(max(layer.values(), default=0)) + BOX_W + PAD
    height = max(centre.values(), default=0) + BOX_H / 2 + PAD + 24
    arrow = ('<marker id="{id}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{c}"/></marker>')
    n_stale = len(lineage.stale())
    legend = (f"{len(lineage.nodes)} nodes, {len(lineage.edges)} edges; "
              + (f"{n_stale} stale (dashed red: parent changed or gone since recorded)" if n_stale else "all fresh"))
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
              f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="12">'),
             "<defs>" + arrow.format(id="arrow", c=EDGE) + arrow.format(id="stale", c=STALE) + "</defs>",
             f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>']
    parts += [_svg_edge(e, layer, centre) for e in sorted(lineage.edges, key=lambda e: e.fresh, reverse=True)]
    parts += [_svg_node(n, lineage.nodes[n], _column_x(layer[n]), centre[("node", n)] - BOX_H / 2)
              for n in sorted(lineage.nodes)]
    parts.append(f'<text class="legend" x="{PAD}" y="{height - 10:.0f}" font-size="11" fill="#455a64">'
                 f"{html.escape(legend)}</text></svg>")
    return "\n".join(parts) + "\n"


def lineage_mermaid(lineage: Lineage) -> str:
    """The same graph as a fenced ```mermaid ``flowchart LR`` block for the Markdown report;
    stale edges are dotted, red and labelled "(stale)"."""
    layer = lineage.layers()
    order = sorted(lineage.nodes, key=lambda n: (layer[n], n))
    ids = {n: f"n{i}" for i, n in enumerate(order)}
    lines = ["```mermaid", "flowchart LR"]
    for n in order:
        head, short = (_mermaid_text(s) for s in node_label(n, lineage.nodes[n]))
        lines.append(f'  {ids[n]}["{head}<br/>{short}"]')
    stale = []
    for i, e in enumerate(lineage.edges):
        label = _mermaid_text(e.label).replace("|", "/") + ("" if e.fresh else " (stale)")
        arrow = "-->" if e.fresh else "-.->"
        lines.append(f"  {ids[e.parent]} {arrow}|{label}| {ids[e.child]}")
        stale += [] if e.fresh else [str(i)]
    if stale:
        lines.append(f"  linkStyle {','.join(stale)} stroke:{STALE},stroke-width:2px")
    missing = [ids[n] for n in order if lineage.nodes[n]["kind"] == "missing"]
    if missing:
        lines += [f"  classDef missing fill:#ffebee,stroke:{STALE},stroke-dasharray:4 3",
                  f"  class {','.join(missing)} missing"]
    return "\n".join([*lines, "```"]) + "\n"


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
