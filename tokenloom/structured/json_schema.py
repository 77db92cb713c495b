"""JSON-schema rewrites that let a backend enforce more schemas exactly, applied before compiling:

- `format` values a backend does not know are dropped: JSON Schema makes `format` an annotation unless a
  validator opts in, so an unknown one constrains nothing (as `jsonschema.validate` treats it);
- dependencies ("if A is present, B and C are too": `dependencies` / `dependentRequired` with a list; "if A
  is present, the object also matches S": a schema, or `dependentSchemas`) become an `anyOf` of the object
  without A and the object with A (B and C required, or `allOf` with S) — the same set of documents, in
  keywords constraint engines implement. More than `MAX_DEPENDENCIES` per object is refused;
- a `oneOf` whose branches no document can match twice (different types, different constants, a required
  property with different constants: a discriminator, or a property one requires and another forbids) is
  the same as an `anyOf`, and becomes one; branches that differ only by the properties they require ("one of
  these groups") are first narrowed to forbid the other groups' properties, and `not: {required: [...]}` to
  forbid them all: sound narrowings (every output still matches the schema; a few valid documents are no
  longer produced). Any other `oneOf` stays and is refused, as "exactly one" cannot be enforced token by
  token.
"""

from __future__ import annotations

import copy
from typing import Any

MAX_DEPENDENCIES = 4  # 2^4 = 16 branches of one object schema at most
# keywords whose value maps names to schemas (the map itself is not a schema: a property may be called
# "dependencies")
_SCHEMA_MAPS = ("properties", "patternProperties", "definitions", "$defs", "dependentSchemas")


def drop_format(schema: Any, name: str) -> Any:
    """`schema` with every `"format": name` removed (a copy; the input is not changed)."""
    if isinstance(schema, dict):
        return {k: drop_format(v, name) for k, v in schema.items() if not (k == "format" and v == name)}
    if isinstance(schema, list):
        return [drop_format(v, name) for v in schema]
    return schema


def expand_dependencies(schema: Any) -> Any:
    """`schema` with property dependencies rewritten as `anyOf` branches (a copy); ValueError when an object
    has more than MAX_DEPENDENCIES of them."""
    if isinstance(schema, list):
        return [expand_dependencies(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: {name: expand_dependencies(v) for name, v in value.items()} if k in _SCHEMA_MAPS
           and isinstance(value, dict) else expand_dependencies(value) for k, value in schema.items()}
    deps: dict[str, list[str] | dict[str, Any]] = {}
    for key in ("dependencies", "dependentRequired", "dependentSchemas"):
        value = out.get(key)
        if isinstance(value, dict) and all(isinstance(v, dict) or (isinstance(v, list) and all(
                isinstance(n, str) for n in v)) for v in value.values()):
            deps.update(out.pop(key))
    if not deps:
        return out
    required = set(out.get("required", []))
    for prop in [p for p in deps if p in required and isinstance(deps[p], list)]:
        required |= set(deps.pop(prop))  # present anyway: its dependents are simply required
    if required:
        out["required"] = sorted(required)
    if len(deps) > MAX_DEPENDENCIES:
        raise ValueError(f"an object with {len(deps)} property dependencies (at most {MAX_DEPENDENCIES} are "
                         f"supported): {sorted(deps)}")
    branches = [out]
    for prop, needs in deps.items():
        branches = [b for branch in branches for b in _split(branch, prop, needs)]
    branches = [b for b in branches if _satisfiable(b)]
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def _satisfiable(schema: dict[str, Any]) -> bool:
    """False when a branch requires a property it also forbids (two dependencies crossing)."""
    if "allOf" in schema:
        return all(_satisfiable(part) for part in schema["allOf"])
    forbidden = {p for p, v in schema.get("properties", {}).items() if v is False}
    return not forbidden & set(schema.get("required", []))


def _split(schema: dict[str, Any], prop: str, needs: list[str] | dict[str, Any]) -> list[dict[str, Any]]:
    """The two cases of one dependency: `prop` absent, or `prop` present with `needs` (the properties it
    requires, or the schema the object must then also match)."""
    absent = copy.deepcopy(schema)
    absent["properties"] = {**absent.get("properties", {}), prop: False}
    present = copy.deepcopy(schema)
    present["required"] = sorted({*present.get("required", []), prop, *(needs if isinstance(needs, list) else ())})
    if isinstance(needs, dict):
        present = {"allOf": [present, needs]}
    return [absent, present]


def disjoint_one_of(schema: Any) -> Any:
    """`schema` with every `oneOf` whose branches are pairwise disjoint turned into `anyOf` (a copy)."""
    return _one_of(schema, schema)


def _one_of(schema: Any, root: Any) -> Any:
    if isinstance(schema, list):
        return [_one_of(v, root) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: {name: _one_of(v, root) for name, v in value.items()} if k in _SCHEMA_MAPS
           and isinstance(value, dict) else _one_of(value, root) for k, value in schema.items()}
    if _is_not_required(out.get("not")):  # "not all of these": soundly, none of them
        out = {**out, "properties": {**out.get("properties", {}), **dict.fromkeys(out.pop("not")["required"], False)}}
    branches = out.get("oneOf")
    if isinstance(branches, list) and "anyOf" not in out:
        resolved = [_resolve(b, root) for b in branches]
        if not _pairwise_disjoint(resolved, root):
            resolved = [_exclusive(b, resolved[:i] + resolved[i + 1:], root) for i, b in enumerate(resolved)]
        if _pairwise_disjoint(resolved, root):
            out.pop("oneOf")
            out["anyOf"] = resolved
    return out


def _is_not_required(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"required"} and isinstance(value["required"], list) \
        and bool(value["required"])


def _pairwise_disjoint(branches: list[Any], root: Any) -> bool:
    return all(_disjoint(a, b, root) for i, a in enumerate(branches) for b in branches[i + 1:])


def _exclusive(branch: Any, others: list[Any], root: Any) -> Any:
    """`branch` narrowed so that no document matching it can match another branch that only differs by its
    required properties: those properties are forbidden here (a sound narrowing: "exactly one of these
    groups" outputs one group and nothing of the others)."""
    if not isinstance(branch, dict):
        return branch
    own = set(branch.get("required", []))
    forbid = set()
    for other in others:
        if isinstance(other, dict) and not _disjoint(branch, other, root):
            forbid |= set(other.get("required", [])) - own
    if not forbid:
        return branch
    return {**branch, "properties": {**branch.get("properties", {}), **dict.fromkeys(sorted(forbid), False)}}


def _resolve(schema: Any, root: Any, depth: int = 8) -> Any:
    """Follow a local `$ref` (#/definitions/..., #/$defs/...); anything else is returned as it is."""
    while depth and isinstance(schema, dict) and isinstance(schema.get("$ref"), str) \
            and schema["$ref"].startswith("#/"):
        target = root
        for part in schema["$ref"][2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                return schema
            target = target[part]
        schema, depth = target, depth - 1
    return schema


_NUMBER = {"integer", "number"}


def _types(schema: Any) -> set[str] | None:
    """The JSON types a branch allows (integer counted as number), None when it does not say."""
    if not isinstance(schema, dict):
        return None
    values = _constants(schema)
    if values is not None:
        return {_type_of(v) for v in values}
    kind = schema.get("type")
    if isinstance(kind, str):
        kind = [kind]
    if not isinstance(kind, list):
        return None
    return {"number" if k in _NUMBER else k for k in kind}


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def _constants(schema: Any) -> list[Any] | None:
    """The values a schema allows when it lists them (const / enum), else None."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return [schema["const"]]
    enum = schema.get("enum")
    return list(enum) if isinstance(enum, list) else None


def _disjoint(a: Any, b: Any, root: Any) -> bool:
    """True when no document matches both branches (a sufficient check, not a complete one)."""
    ta, tb = _types(a), _types(b)
    if ta is not None and tb is not None and not ta & tb:
        return True
    ca, cb = _constants(a), _constants(b)
    if ca is not None and cb is not None and not any(x == y for x in ca for y in cb):
        return True
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    props_a, props_b = a.get("properties", {}), b.get("properties", {})
    if not isinstance(props_a, dict) or not isinstance(props_b, dict):
        return False
    required_a, required_b = set(a.get("required", [])), set(b.get("required", []))
    if any(props_b.get(p) is False for p in required_a) or any(props_a.get(p) is False for p in required_b):
        return True  # one requires a property the other forbids
    shared = required_a & required_b
    return any(_disjoint(_resolve(props_a[p], root), _resolve(props_b[p], root), root)
               for p in shared if p in props_a and p in props_b)
