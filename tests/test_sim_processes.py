"""The default processes as data: graph shape and lookups."""

from __future__ import annotations

import pytest

from worker.processes import (
    DEFAULT_BOOKING,
    DEFAULT_PURCHASE,
    INITIAL_STATE,
    PROCESSES,
    IllegalTransitionError,
    Process,
    UnknownProcessError,
    get_process,
)


def test_names_versions_aliases() -> None:
    assert sorted(PROCESSES) == ["default-booking", "default-purchase"]
    for process in PROCESSES.values():
        assert process.version == 1
        assert process.alias == f"{process.name}/release-1"
        assert get_process(process.alias) is process
    with pytest.raises(UnknownProcessError):
        get_process("preauth-nightly")


@pytest.mark.parametrize("process", [DEFAULT_BOOKING, DEFAULT_PURCHASE])
def test_every_state_is_reachable_and_every_path_ends(process: Process) -> None:
    reached = {INITIAL_STATE}
    frontier = [INITIAL_STATE]
    while frontier:
        for tr in process.next_transitions(frontier.pop()):
            if tr.to_state not in reached:
                reached.add(tr.to_state)
                frontier.append(tr.to_state)
    assert reached == process.states
    assert process.final_states
    assert process.cancelled_state in process.final_states
    assert "state/inquiry" not in process.final_states


def test_initial_transitions_and_cancelled_spelling() -> None:
    for process in PROCESSES.values():
        names = {t.name for t in process.initial_transitions}
        assert names == {"transition/inquire", "transition/request-payment"}
    assert DEFAULT_BOOKING.cancelled_state == "state/cancelled"
    assert DEFAULT_PURCHASE.cancelled_state == "state/canceled"
    assert DEFAULT_BOOKING.has_booking and not DEFAULT_PURCHASE.has_booking


def test_targets_actors_and_illegal_moves() -> None:
    assert DEFAULT_BOOKING.target("state/preauthorized", "transition/accept") == "state/accepted"
    assert DEFAULT_PURCHASE.target("state/pending-payment", "transition/confirm-payment") == "state/purchased"
    assert DEFAULT_BOOKING.transition("transition/operator-accept").actor == "operator"
    assert DEFAULT_BOOKING.transition("transition/expire-payment").actor == "system"
    with pytest.raises(IllegalTransitionError):
        DEFAULT_BOOKING.target("state/accepted", "transition/accept")
    with pytest.raises(IllegalTransitionError):
        DEFAULT_BOOKING.transition("transition/mark-delivered")
    assert DEFAULT_PURCHASE.next_transitions("state/reviewed") == ()


def test_transition_lists_match_the_notes() -> None:
    reviews = {
        "review-1-by-provider",
        "review-2-by-provider",
        "review-1-by-customer",
        "review-2-by-customer",
        "expire-review-period",
        "expire-provider-review-period",
        "expire-customer-review-period",
    }
    common = {
        "inquire",
        "request-payment",
        "request-payment-after-inquiry",
        "expire-payment",
        "confirm-payment",
    }
    booking = common | reviews | {
        "accept", "operator-accept", "decline", "operator-decline", "expire",
        "complete", "operator-complete", "cancel",
    }  # fmt: skip
    purchase = common | reviews | {
        "mark-delivered", "operator-mark-delivered", "mark-received", "mark-received-from-purchased",
        "auto-mark-received", "dispute", "operator-dispute", "mark-received-from-disputed",
        "cancel", "auto-cancel", "cancel-from-disputed", "auto-cancel-from-disputed", "auto-complete",
    }  # fmt: skip
    assert set(DEFAULT_BOOKING.transitions) == {f"transition/{n}" for n in booking}
    assert set(DEFAULT_PURCHASE.transitions) == {f"transition/{n}" for n in purchase}
