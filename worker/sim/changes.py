"""``previousValues``: what a resource was before an event changed it.

The rules follow Sharetribe's events reference:

* Only what changed is given: top-level attributes and relationships whose value
  differs, each with its *entire* previous value (nested objects and arrays such
  as ``lineItems`` or ``transitions`` included). An attribute that had no value is
  given as ``null``.
* Extended data (``publicData``, ``protectedData``, ``privateData``, ``metadata``)
  is a set of top-level keys, compared key by key: a key that was added is given as
  ``null``; a key that changed or was removed is given with its entire previous
  value. Keys that did not change are left out.
* A user's ``profile`` holds plain attributes and extended data side by side; it is
  compared the same way one level down (choice: the reference shows extended data
  only at the top of a listing).
* ``previousValues`` has the shape of the event's ``resource``: ``attributes`` and
  ``relationships`` members, each present only when something in it changed.

For ``*/deleted`` events there is no resource after the change; :func:`removed`
gives everything the resource had.

The functions keep the values they find in ``before`` (or ``old``) rather than copy
them: every store mutation renders a fresh tree first (resources always render fresh
containers), and copying each transaction's history again on every transition was
a good share of a traffic step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker.sim.resources import JsonObject

__all__ = ["EXTENDED_DATA", "extended_data_changes", "previous_values", "removed"]

#: Attribute names holding extended data, compared key by key.
EXTENDED_DATA = frozenset({"publicData", "protectedData", "privateData", "metadata"})

# Attributes holding further attributes, compared one level down.
_NESTED = frozenset({"profile"})


def previous_values(before: Mapping[str, Any], after: Mapping[str, Any]) -> JsonObject:
    """``previousValues`` for a resource tree that went from ``before`` to ``after``."""
    out: JsonObject = {}
    attributes = _changed_attributes(before.get("attributes") or {}, after.get("attributes") or {})
    if attributes:
        out["attributes"] = attributes
    old_rels, new_rels = before.get("relationships") or {}, after.get("relationships") or {}
    relationships = {
        name: old_rels.get(name)
        for name in _names(new_rels, old_rels)
        if old_rels.get(name) != new_rels.get(name)
    }
    if relationships:
        out["relationships"] = relationships
    return out


def removed(before: Mapping[str, Any]) -> JsonObject:
    """``previousValues`` of a deletion: every attribute and relationship the resource had."""
    out: JsonObject = {"attributes": dict(before.get("attributes") or {})}
    if before.get("relationships"):
        out["relationships"] = dict(before["relationships"])
    return out


def extended_data_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> JsonObject:
    """Per top-level key of extended data: ``null`` if it was added, its old value if changed or removed."""
    return {key: old.get(key) for key in _names(new, old) if old.get(key) != new.get(key)}


def _changed_attributes(old: Mapping[str, Any], new: Mapping[str, Any]) -> JsonObject:
    out: JsonObject = {}
    for name in _names(new, old):
        was, now = old.get(name), new.get(name)
        if was == now:
            continue
        if isinstance(was, dict) and isinstance(now, dict):
            if name in EXTENDED_DATA:
                out[name] = extended_data_changes(was, now)
                continue
            if name in _NESTED:
                out[name] = _changed_attributes(was, now)
                continue
        out[name] = was
    return out


def _names(first: Mapping[str, Any], second: Mapping[str, Any]) -> list[str]:
    # Keys of both, in a stable order: answers stay byte-identical for one seed.
    if first.keys() == second.keys():
        return list(first)
    seen = dict.fromkeys(first)
    seen.update(dict.fromkeys(second))
    return list(seen)
