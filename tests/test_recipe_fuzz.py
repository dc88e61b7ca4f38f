"""Property test: any single mutation that breaks a valid recipe makes `mixerdistill run` (and
`validate`) exit with code 2 and a message naming the YAML location, never a traceback, and no file
is created or changed.

Mutations of `recipes/tiny.yaml`: wrong types, unknown keys, missing required fields, out-of-range
numbers, paths that do not exist, unknown plugin names and malformed YAML text. The CLI runs in
process, so hundreds of cases take seconds. `teacher.config` is left alone: it is passed as is to
the transformers config class, which the schema does not describe.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, cli_in_process

MIN_CASES = 300


def base_recipe() -> dict:
    """recipes/tiny.yaml with absolute data paths, so the mutated copy can live anywhere."""
    data = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    data["data"]["paths"] = [str((REPO / "recipes" / p).resolve()) for p in data["data"]["paths"]]
    return data


BASE = base_recipe()


@dataclass
class Mutation:
    kind: str
    location: str  # the dotted path (or "line N") the error message must name
    text: str  # the recipe file's new content


def _get(data, path: tuple):
    for key in path:
        data = data[key]
    return data


def _leaves(data, path=()) -> list[tuple]:
    """Paths of every scalar or list-of-scalars in the recipe, outside teacher.config."""
    if path == ("teacher", "config"):
        return []
    if isinstance(data, dict):
        return [p for key, value in data.items() for p in _leaves(value, path + (key,))] + ([path] if path else [])
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return [p for i, value in enumerate(data) for p in _leaves(value, path + (i,))] + [path]
    return [path]


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _mutated(change) -> str:
    data = copy.deepcopy(BASE)
    change(data)
    return yaml.safe_dump(data, sort_keys=False)


def _set(path: tuple, value):
    def change(data):
        _get(data, path[:-1])[path[-1]] = value

    return change


WRONG_VALUES = {  # a value of another type, for each original type
    bool: ["maybe", [1], {"a": 1}],
    int: ["many", [1], {"a": 1}, 1.5, "[/bold]"],
    float: ["fast", [1.0], {"a": 1}],
    str: [["x"], {"a": 1}, 12, 3.5],
    list: ["not-a-list", {"a": 1}, 7],
    dict: ["not-a-mapping", [1, 2], 7],
}
# Leaves whose value may legitimately be of several types are skipped for type mutations.
ANY_TYPE = {("eval", "prompt")}


@st.composite
def wrong_type(draw) -> Mutation:
    paths = [p for p in _leaves(BASE) if p not in ANY_TYPE and type(_get(BASE, p)) in WRONG_VALUES]
    path = draw(st.sampled_from(paths))
    value = draw(st.sampled_from(WRONG_VALUES[type(_get(BASE, path))]))
    return Mutation("wrong type", _dotted(path), _mutated(_set(path, value)))


MAPPINGS = [
    (),
    ("teacher",),
    ("student",),
    ("student", "mixer"),
    ("data",),
    ("stages", 0),
    ("stages", 1),
    ("stages", 2),
    ("stages", 0, "optimizer"),
    ("stages", 2, "optimizer"),
    ("eval",),
]
WORDS = st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True).map(lambda w: f"{w}_zz")


@st.composite
def unknown_key(draw) -> Mutation:
    node = draw(st.sampled_from(MAPPINGS))
    key = draw(WORDS)
    value = draw(st.one_of(st.integers(), st.text(max_size=5), st.booleans()))
    return Mutation("unknown key", _dotted(node + (key,)), _mutated(_set(node + (key,), value)))


REQUIRED = [
    ("name",),
    ("teacher",),
    ("teacher", "source"),
    ("teacher", "model_type"),
    ("student",),
    ("student", "mixer"),
    ("student", "mixer", "name"),
    ("data",),
    ("data", "source"),
    ("data", "paths"),
    ("stages", 0, "name"),
    ("stages", 1, "tokens"),
    ("stages", 2, "tokens"),
]


@st.composite
def missing_field(draw) -> Mutation:
    path = draw(st.sampled_from(REQUIRED))

    def change(data):
        del _get(data, path[:-1])[path[-1]]

    return Mutation("missing field", _dotted(path), _mutated(change))


def _below(limit, integer=True, inclusive=True):
    """Numbers under ``limit`` (or equal to it when ``inclusive``)."""
    if integer:
        return st.integers(max_value=limit if inclusive else limit - 1, min_value=-(10**9))
    return st.floats(max_value=limit, exclude_max=not inclusive, min_value=-1e30, allow_nan=False)


STAGE = ("stages", 1)
OUT_OF_RANGE = [  # (path, strategy of invalid values, location the message names)
    (("threads",), _below(0), None),
    (STAGE + ("tokens",), _below(0), None),
    (STAGE + ("batch_size",), _below(0), None),
    (STAGE + ("seq_len",), _below(1), None),
    (STAGE + ("optimizer", "lr"), _below(0.0, integer=False), None),
    (STAGE + ("optimizer", "eps"), _below(0.0, integer=False), None),
    (STAGE + ("optimizer", "weight_decay"), _below(0.0, integer=False, inclusive=False), None),
    (
        STAGE + ("optimizer", "betas"),
        st.tuples(st.floats(1.0, 10.0), st.floats(0.0, 0.99)).map(list),
        STAGE + ("optimizer",),
    ),
    (STAGE + ("schedule", "warmup"), st.floats(1.0, 1e6, exclude_min=True), None),
    (STAGE + ("schedule", "decay"), _below(0.0, integer=False, inclusive=False), None),
    (STAGE + ("grad_clip",), _below(0.0, integer=False), None),
    (STAGE + ("skip_nonfinite",), _below(-1), None),
    (("eval", "tokens"), _below(-1), None),
    (("eval", "seq_len"), _below(1), None),
    (("eval", "batch_size"), _below(0), None),
    (("eval", "every_tokens"), _below(0), None),
    (("eval", "max_new_tokens"), _below(0), None),
    (("data", "heldout_fraction"), st.one_of(_below(0.0, integer=False), st.floats(1.0, 1e6)), None),
    (("student", "mixer", "chunk_size"), _below(0), None),
    (("student", "mixer", "a_init"), st.floats(1.0, 100.0), None),
    (
        ("student", "keep_attention"),
        st.lists(_below(-1), min_size=1, max_size=3).map(list),
        ("student", "keep_attention", 0),
    ),
    (("output", "checkpoint", "every_steps"), _below(0), None),
    (("output", "checkpoint", "every_minutes"), _below(0.0, integer=False), None),
]


@st.composite
def out_of_range(draw) -> Mutation:
    path, values, location = draw(st.sampled_from(OUT_OF_RANGE))
    value = draw(values)

    def change(data):
        node = data
        for key in path[:-1]:
            node = node[key] if isinstance(node, list) else node.setdefault(key, {})
        node[path[-1]] = value

    where = _dotted(location or path)
    if location == ("student", "keep_attention", 0):
        where = "student.keep_attention."  # the first bad index
    return Mutation("out of range", where, _mutated(change))


@st.composite
def bad_path(draw) -> Mutation:
    name = draw(WORDS)
    missing = f"/nonexistent-{name}/corpus/*.txt"
    choice = draw(st.sampled_from(["paths", "heldout_paths", "teacher"]))
    if choice == "teacher":

        def change(data):
            data["teacher"] = {"source": "local", "path": f"/nonexistent-{name}/model"}

        return Mutation("bad path", "teacher.path", _mutated(change))
    keep = draw(st.booleans())  # also next to a path that does exist
    value = (BASE["data"]["paths"][:1] if keep else []) + [missing]
    return Mutation("bad path", f"data.{choice}", _mutated(_set(("data", choice), value)))


PLUGIN_NAMES = [
    ("student", "mixer", "name"),
    ("data", "source"),
    ("stages", 0, "name"),
    ("stages", 2, "name"),
    ("teacher", "source"),
    ("teacher", "adapter"),
    ("teacher", "model_type"),
]


@st.composite
def unknown_plugin(draw) -> Mutation:
    path = draw(st.sampled_from(PLUGIN_NAMES))
    name = draw(WORDS)
    return Mutation("unknown plugin", _dotted(path), _mutated(_set(path, name)))


BREAKERS = [
    "key: [unclosed",
    "key: {a: 1",
    "key: 'open",
    "\tindented: with a tab",
    "- [",
    "]",
    "key: !!python/object/apply:os.system ['true']",
    "@reserved",
    "a: b: c",
    "? [",
    "*undefined_alias",
]


@st.composite
def malformed_yaml(draw) -> Mutation:
    lines = (REPO / "recipes" / "tiny.yaml").read_text().splitlines()
    at = draw(st.integers(0, len(lines)))
    indent = draw(st.sampled_from(["", "  ", "    "]))
    lines.insert(at, indent + draw(st.sampled_from(BREAKERS)))
    text = "\n".join(lines) + "\n"
    try:
        yaml.safe_load(text)
    except yaml.YAMLError:
        return Mutation("malformed YAML", "malformed YAML: line ", text)
    # Some insertions still parse (e.g. a new top-level key): then the schema must catch them.
    return Mutation("malformed YAML", "", text)


MUTATIONS = st.one_of(
    wrong_type(), unknown_key(), missing_field(), out_of_range(), bad_path(), unknown_plugin(), malformed_yaml()
)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_mutated_recipes_fail_cleanly(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    recipe, output = folder / "recipe.yaml", folder / "out"
    kinds: list[str] = []

    @settings(
        max_examples=350, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(mutation=MUTATIONS, command=st.sampled_from(["run", "validate"]))
    def check(mutation: Mutation, command: str):
        kinds.append(mutation.kind)
        recipe.write_text(mutation.text)
        before = _snapshot(folder)
        args = (
            ["run", str(recipe), "--output", str(output), "--no-progress"]
            if command == "run"
            else ["validate", str(recipe)]
        )
        code, text = cli_in_process(*args)
        assert code == 2, (mutation, text)
        assert "Traceback" not in text, text
        assert "error:" in text and mutation.location in text, (mutation.location, text)
        assert _snapshot(folder) == before and not output.exists()

    check()
    assert len(kinds) >= MIN_CASES
    assert set(kinds) == {
        "wrong type",
        "unknown key",
        "missing field",
        "out of range",
        "bad path",
        "unknown plugin",
        "malformed YAML",
    }
    print(f"{len(kinds)} mutated recipes: " + ", ".join(f"{k} {kinds.count(k)}" for k in sorted(set(kinds))))


@pytest.mark.parametrize(
    "text, location",
    [
        ("name: [unclosed\n", "malformed YAML: line 2"),
        ("stages:\n  - name: matrix_orientation\n    tokens: -5\n", "stages.0.tokens"),
    ],
)
def test_examples_of_mutations(tmp_path, text, location):
    """Two fixed cases, so a failure of the property test has a simple neighbour to compare with."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    code, output = cli_in_process("validate", str(recipe))
    assert code == 2 and location in output and "Traceback" not in output
