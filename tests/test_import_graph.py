"""The package's import graph has no circles. Every `import` of one of our modules counts, those inside
functions too: an import moved into a function still closes the circle when it runs, so it may only be
there for laziness (MindSpore, OpenCV, startup time), never to break a circle."""
import ast
import os

import mindxcomposer

ROOT = os.path.dirname(mindxcomposer.__file__)
PACKAGE = "mindxcomposer"


def _modules():
    mods = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = ".".join([PACKAGE] + os.path.relpath(path[:-3], ROOT).split(os.sep))
                mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _imported(module, node, is_package, mods):
    """The modules of ours an import statement loads (a `from pkg import name` loads pkg.name when that is a
    module, pkg otherwise)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    if node.level:
        base = module.split(".")[:len(module.split(".")) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != PACKAGE:
        return []
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]


def import_graph():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_imported(name, node, path.endswith("__init__.py"), mods))
        graph[name] = {m for m in edges if m in mods and m != name}
    return graph


def find_cycle(graph):
    """One cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        state[v] = "done"
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50 and "mindxcomposer.serve.batching" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_a_circle_is_found():
    # the check itself: a circle through a function-level import, and the relative-import resolution
    graph = import_graph()
    assert "mindxcomposer.validation" in graph["mindxcomposer.image_processing"]
    assert "mindxcomposer.serve.engine" in graph["mindxcomposer.serve.engines"]
    graph["mindxcomposer.constants"] = graph["mindxcomposer.constants"] | {"mindxcomposer.validation"}
    cycle = find_cycle(graph)
    assert cycle is not None and "mindxcomposer.constants" in cycle


def test_shared_names_live_in_constants():
    # the leaf every module takes shared names from imports nothing of ours
    assert import_graph()["mindxcomposer.constants"] == set()


def test_serve_uses_only_public_names_of_the_model_and_session():
    """The server talks to the model through `ModelSession`'s public API: no `_private` name is imported
    from outside `serve/`, and no `_private` attribute is read but its own objects' (`self`, a request's
    `self.engine`)."""
    found = []
    folder = os.path.join(ROOT, "serve")
    for f in sorted(os.listdir(folder)):
        if not f.endswith(".py"):
            continue
        with open(os.path.join(folder, f), encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level != 1:
                found += [f"{f}:{node.lineno} imports {a.name}" for a in node.names if a.name.startswith("_")]
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and ast.unparse(node.value) not in ("self", "self.engine")):
                found.append(f"{f}:{node.lineno} reads {ast.unparse(node)}")
    assert not found, found
