"""Fuzzing the params boundary: hypothesis (derandomized, so every CI run tries the same inputs)
mutates the shipped presets and garbles their YAML. The property: the file validates, or
``load_params`` refuses it with a ParamsError whose every line names the file."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from slimforge.config import Params, ParamsError, load_params

REPO = Path(__file__).resolve().parents[2]
PRESETS = {p.name: p.read_text() for p in [*sorted((REPO / "params").glob("*.yaml")), REPO / "params.yaml"]}
PARAMS_EXAMPLES = 520


# ---------------------------------------------------------------- params files

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["", "kaiming", "cnn", "file", "s3://b/k.npz", "ties", "1e-3", "yes"]))
JUNK = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
KEYS = st.one_of(st.text(max_size=10), st.sampled_from(["method", "arch", "scheme", "path", "lambdas", "tasks",
                                                        "checkpoints", "distributed", "variants", "x\ny"]))
MUTATIONS = ("drop", "add", "replace", "junk", "method", "swap_type")


def _paths(node, prefix=()) -> list[tuple]:
    """Every key path (through dicts and lists) of a parsed YAML tree."""
    out = [prefix]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        out += _paths(v, (*prefix, k))
    return out


def _parent(tree, path):
    for part in path[:-1]:
        tree = tree[part]
    return tree


def _swap_type(value):
    """The same content in another YAML type: 3 -> '3', 'a' -> ['a'], [1] -> {0: 1}, ..."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return dict(enumerate(value))
    if isinstance(value, dict):
        return list(value.values())
    return 0


def _mutate(data, tree) -> None:
    """Apply one mutation (drawn from ``data``) to the parsed params ``tree`` in place."""
    kind = data.draw(st.sampled_from(MUTATIONS), label="mutation")
    paths = [p for p in _paths(tree) if p]
    if not paths:
        tree[data.draw(KEYS)] = data.draw(JUNK)
        return
    path = data.draw(st.sampled_from(paths), label="path")
    parent, key = _parent(tree, path), path[-1]
    if kind == "drop":
        parent.pop(key)  # a dict key or a list index alike
    elif kind == "add":
        target = parent[key] if isinstance(parent[key], dict) else parent
        if isinstance(target, dict):
            target[data.draw(KEYS, label="new key")] = data.draw(JUNK, label="new value")
        else:
            target.append(data.draw(JUNK))
    elif kind == "replace":
        parent[key] = data.draw(SCALARS, label="scalar")
    elif kind == "junk":
        parent[key] = data.draw(JUNK, label="junk")
    elif kind == "method":
        section = parent[key] if isinstance(parent[key], dict) else parent
        if isinstance(section, dict):
            tag = data.draw(st.sampled_from(["method", "scheme", "arch", "dataset", "transform", "optimizer"]))
            section[tag] = data.draw(st.one_of(st.text(max_size=10), st.sampled_from(
                ["ties", "dare", "gptq", "rtn", "el2n", "magnitude", "vit", "mlp", "pretrained", "rewind"])))
    else:
        parent[key] = _swap_type(parent[key])


def _garble(data, text: str) -> str:
    """YAML-level damage: truncate, splice random characters, or break the indentation."""
    kind = data.draw(st.sampled_from(["truncate", "splice", "indent", "random"]), label="garble")
    if kind == "random":
        return data.draw(st.text(alphabet=st.sampled_from(list(":-[]{}#&*!|>'\"%@`, \n\tab01.")), max_size=80))
    at = data.draw(st.integers(0, len(text)), label="at")
    if kind == "truncate":
        return text[:at]
    if kind == "splice":
        return text[:at] + data.draw(st.text(max_size=6), label="spliced") + text[at:]
    lines = text.splitlines()
    i = at % max(len(lines), 1)
    return "\n".join(lines[:i] + ["   " + ln for ln in lines[i:i + 1]] + lines[i + 1:])


@st.composite
def params_texts(draw):
    """(kind, text) of a params file: a mutated preset, a garbled one, or a raw junk document."""
    preset = draw(st.sampled_from(sorted(PRESETS)), label="preset")
    kind = draw(st.sampled_from(["mutated"] * 6 + ["garbled", "document"]), label="kind")
    if kind == "garbled":
        return kind, _garble(draw(st.data()), PRESETS[preset])
    if kind == "document":
        return kind, yaml.safe_dump(draw(JUNK, label="document"))
    tree = yaml.safe_load(PRESETS[preset]) or {}
    data = draw(st.data())
    for _ in range(draw(st.integers(1, 4), label="mutations")):
        _mutate(data, tree)
    return kind, yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


def test_fuzzed_params_validate_or_give_a_named_error(tmp_path, fuzz_log):
    @settings(fuzz_log.settings, max_examples=PARAMS_EXAMPLES)
    @given(params_texts())
    def check(case):
        kind, text = case
        path = tmp_path / "fuzzed.yaml"
        path.write_text(text)
        params = fuzz_log.attempt(lambda: load_params(path), ParamsError, str(path), kind, text, ok="valid")
        assert params is None or isinstance(params, Params)

    check()
    tally = fuzz_log.tally
    print(f"\nparams files fuzzed: {sum(tally.values())} {dict(sorted(tally.items()))}")
    assert not fuzz_log.bugs, fuzz_log.report()
    assert sum(tally.values()) >= 500
    assert tally["mutated: valid"] and tally["mutated: refused"]
