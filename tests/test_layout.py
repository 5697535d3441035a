"""The package's imports run one way, the way data flows; this test keeps it so.

``worker/`` is arranged in rooms along the data's path (``api`` → ``poll`` →
``queue`` → ``deliver``, plus ``ops`` and ``sim``), with the shared vocabulary and
the entry points at its top. Each room sits on a layer; a module may import its own
room and rooms on lower layers only. Rooms on one layer never import each other:
``api``, ``settings`` and ``processes``; ``queue`` (which knows events, not handlers)
and ``plugin``; ``poll`` and ``deliver``; ``ops`` and ``sim`` (the simulator is for
tests and the demo: nothing the service runs imports it). Built-in handlers in
``handlers/`` import only the public faces a third-party plugin would.

The imports are read with :mod:`ast`, so a function-local import or one under
``TYPE_CHECKING`` counts like any other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Lowest first. A room is a folder of ``worker/`` or a module at its top.
LAYERS: list[tuple[str, ...]] = [
    ("worker", "errors"),
    ("api", "settings", "processes"),
    ("events",),
    ("queue", "plugin"),
    ("registry",),
    ("poll", "deliver"),
    ("ops", "sim"),
    ("entry points",),
]
#: The top-level modules that start or wire the service; they may import each other.
ENTRY_POINTS = {"cli", "service", "demo", "testing", "trial"}
#: What a built-in handler may import of ``worker``: the faces third-party plugins use.
HANDLER_FACES = {"worker", "plugin", "events", "errors", "settings", "processes"}

RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}
FLOW = " → ".join(" / ".join(rooms) for rooms in LAYERS)


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    importer: str
    target: str


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room_of(module: str) -> str | None:
    """The room a ``worker`` module belongs to, or None for a module outside the package."""
    parts = module.split(".")
    if parts[0] != "worker":
        return None
    if len(parts) == 1:
        return "worker"
    return "entry points" if parts[1] in ENTRY_POINTS else parts[1]


def python_files(root: Path) -> Iterator[Path]:
    for package in ("worker", "handlers"):
        yield from sorted((root / package).rglob("*.py"))


def imports(root: Path) -> Iterator[Import]:
    """Every import of ``worker`` or ``handlers`` made by a module of either."""
    modules = {module_name(root, path) for path in python_files(root)}
    for path in python_files(root):
        importer = module_name(root, path)
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                # ``from worker.api import wire`` imports the module ``worker.api.wire``.
                named = [f"{base}.{alias.name}" for alias in node.names]
                targets = [name if name in modules else base for name in named]
            for target in targets:
                if target.split(".")[0] in ("worker", "handlers"):
                    yield Import(path, node.lineno, importer, target)


def problem(found: Import) -> str | None:
    """Why this import runs against the layout, or None when it is allowed."""
    source, target = room_of(found.importer), room_of(found.target)
    if source is None:  # a built-in handler
        if target is not None and target not in HANDLER_FACES:
            return f"a built-in handler imports only the plugin faces ({', '.join(sorted(HANDLER_FACES))})"
        return None
    if target is None:
        return None if source == "entry points" else "only the entry points import handlers/"
    if source == target:
        return None
    for room in (source, target):
        if room not in RANK:
            return f"{room!r} is on no layer: place it in tests/test_layout.py's LAYERS"
    if RANK[target] < RANK[source]:
        return None
    if RANK[target] == RANK[source]:
        return f"{source} and {target} sit side by side and never import each other"
    return f"{source} sits below {target}"


def violations(root: Path) -> list[str]:
    return [
        f"{found.path.relative_to(root)}:{found.line}: {found.importer} imports {found.target}: {why}"
        for found in imports(root)
        if (why := problem(found)) is not None
    ]


def test_every_import_runs_with_the_flow() -> None:
    found = violations(ROOT)
    assert not found, "\n".join([f"imports run {FLOW}; against it:", *found])


def test_every_room_is_on_a_layer() -> None:
    rooms = {room_of(module_name(ROOT, path)) for path in (ROOT / "worker").rglob("*.py")}
    assert rooms - set(RANK) == set()
    assert {"api", "poll", "queue", "deliver", "ops", "sim"} <= rooms
    # A folder without __init__.py would be a namespace package the import reader cannot see.
    folders = [p for p in (ROOT / "worker").rglob("*") if p.is_dir() and p.name != "__pycache__"]
    assert [f for f in folders if not (f / "__init__.py").is_file()] == []


def test_the_public_faces_stay_where_plugin_authors_find_them() -> None:
    for face in ("plugin", "testing", "events", "errors", "settings", "registry"):
        assert (ROOT / "worker" / f"{face}.py").is_file(), face
    assert (ROOT / "worker" / "sim" / "__init__.py").is_file()
    # The types a handler meets are exported by the faces, so a plugin never imports worker.api.
    import worker.events
    import worker.plugin

    assert {"Transaction", "User", "Listing", "Money"} <= set(worker.events.__all__)
    assert "IntegrationClient" in worker.plugin.__all__


def write(root: Path, relative: str, text: str = "") -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(root).parents:
        if parent != Path("."):
            (root / parent / "__init__.py").touch()
    path.write_text(text)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small package with one module in each room, importing nothing yet."""
    for relative in (
        "worker/errors.py",
        "worker/settings.py",
        "worker/events.py",
        "worker/plugin.py",
        "worker/service.py",
        "worker/api/client.py",
        "worker/poll/poller.py",
        "worker/queue/enqueue.py",
        "worker/deliver/delivery.py",
        "worker/ops/status.py",
        "worker/registry.py",
        "worker/processes.py",
        "worker/sim/app.py",
        "handlers/crm.py",
    ):
        write(tmp_path, relative)
    return tmp_path


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("worker/api/client.py", "from worker.poll import poller\n"),
        ("worker/api/client.py", "from worker.settings import Settings\n"),
        ("worker/api/client.py", "from ..queue.enqueue import EventQueue\n"),
        ("worker/poll/poller.py", "def later():\n    from worker.deliver.delivery import Delivery\n"),
        ("worker/deliver/delivery.py", "import worker.poll.poller\n"),
        ("worker/queue/enqueue.py", "from worker.deliver import delivery\n"),
        ("worker/queue/enqueue.py", "if TYPE_CHECKING:\n    import worker.ops.status\n"),
        ("worker/deliver/delivery.py", "from worker.service import run_worker\n"),
        ("worker/poll/poller.py", "from worker import service\n"),
        ("worker/events.py", "from worker.plugin import handler\n"),
        ("worker/poll/poller.py", "import handlers.crm\n"),
        ("handlers/crm.py", "from worker.deliver.delivery import Delivery\n"),
        ("worker/poll/poller.py", "from worker import brand_new_module\n"),
        ("worker/poll/poller.py", "from worker.sim.app import create_app\n"),
        ("worker/deliver/delivery.py", "from worker.sim import Simulator\n"),
        ("worker/queue/enqueue.py", "from worker.registry import LoadedHandler\n"),
        ("worker/api/client.py", "from worker.processes import PROCESSES\n"),
    ],
)
def test_an_import_against_the_flow_is_caught(tree: Path, module: str, source: str) -> None:
    if "brand_new_module" in source:
        write(tree, "worker/brand_new_module.py")
    assert violations(tree) == []
    write(tree, module, source)
    [found] = violations(tree)
    assert found.startswith(f"{module}:")


def test_imports_with_the_flow_pass(tree: Path) -> None:
    write(tree, "worker/poll/poller.py", "from worker.api.client import x\nfrom worker.queue import q\n")
    write(tree, "worker/deliver/delivery.py", "from ..queue.enqueue import q\nfrom worker.plugin import h\n")
    write(tree, "worker/service.py", "import handlers.crm\nfrom worker.deliver import delivery\n")
    write(tree, "handlers/crm.py", "from worker.plugin import handler\nfrom worker.events import E\n")
    assert violations(tree) == []
