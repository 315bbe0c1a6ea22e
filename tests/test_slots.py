"""Core slots: even, disjoint, consecutive CPU groups that never span two sockets; the pinning command."""

from __future__ import annotations

import pytest

from xtalker.parallel import SlotError, available_cpus
from xtalker.parallel import slots as slots_module
from xtalker.parallel.slots import CoreSlot, compact_cpu_list, pin_prefix, plan_slots


def check_disjoint_cover(slots: list[CoreSlot], cpus: list[int]) -> None:
    used = [c for s in slots for c in s.cpus]
    assert sorted(used) == sorted(cpus) and len(used) == len(set(used))


def test_two_cpus_two_slots() -> None:
    slots = plan_slots(2, cpus=[0, 1], sockets={0: 0, 1: 0})
    assert slots == [CoreSlot((0,), 0), CoreSlot((1,), 0)]
    assert [s.threads for s in slots] == [1, 1]


def test_sixteen_cpus_three_slots_are_even_and_consecutive() -> None:
    cpus = list(range(16))
    slots = plan_slots(3, cpus=cpus, sockets={c: 0 for c in cpus})
    assert [s.threads for s in slots] == [6, 5, 5]
    assert [s.cpu_list for s in slots] == ["0-5", "6-10", "11-15"]
    check_disjoint_cover(slots, cpus)


def test_two_sockets_four_slots_never_straddle() -> None:
    cpus = list(range(16))
    sockets = {c: c // 8 for c in cpus}
    slots = plan_slots(4, cpus=cpus, sockets=sockets)
    assert [s.cpu_list for s in slots] == ["0-3", "4-7", "8-11", "12-15"]
    for s in slots:
        assert {sockets[c] for c in s.cpus} == {s.socket}
    check_disjoint_cover(slots, cpus)


def test_interleaved_sockets_group_by_socket() -> None:
    # some machines number the CPUs of two sockets alternately
    cpus = list(range(8))
    sockets = {c: c % 2 for c in cpus}
    slots = plan_slots(2, cpus=cpus, sockets=sockets)
    assert [(s.cpus, s.socket) for s in slots] == [((0, 2, 4, 6), 0), ((1, 3, 5, 7), 1)]
    assert slots[0].cpu_list == "0,2,4,6"


def test_three_slots_on_unequal_sockets() -> None:
    cpus = list(range(12))
    sockets = {c: 0 if c < 8 else 1 for c in cpus}  # 8 + 4 cpus: two slots of 4 on the big socket, one on the small
    slots = plan_slots(3, cpus=cpus, sockets=sockets)
    assert [(s.cpu_list, s.socket) for s in slots] == [("0-3", 0), ("4-7", 0), ("8-11", 1)]
    # 6 + 2 cpus: the small socket still gets a slot, the big one the other two
    cpus = list(range(8))
    sockets = {c: 0 if c < 6 else 1 for c in cpus}
    slots = plan_slots(3, cpus=cpus, sockets=sockets)
    assert [(s.cpu_list, s.socket) for s in slots] == [("0-2", 0), ("3-5", 0), ("6-7", 1)]


def test_fewer_slots_than_sockets_use_the_largest() -> None:
    cpus = list(range(10))
    sockets = {c: 0 if c < 4 else 1 for c in cpus}  # 4 + 6 cpus
    assert plan_slots(1, cpus=cpus, sockets=sockets) == [CoreSlot(tuple(range(4, 10)), 1)]


def test_as_many_slots_as_cpus() -> None:
    cpus = list(range(6))
    sockets = {c: 0 if c < 4 else 1 for c in cpus}
    slots = plan_slots(6, cpus=cpus, sockets=sockets)
    assert [s.cpus for s in slots] == [(c,) for c in cpus]
    assert [s.socket for s in slots] == [0, 0, 0, 0, 1, 1]


def test_too_many_slots_refused_with_one_clear_line() -> None:
    with pytest.raises(SlotError) as e:
        plan_slots(5, cpus=[0, 1], sockets={0: 0, 1: 0})
    assert str(e.value) == "--slot 5: this process may use only 2 CPU cores (0-1); use --slot 2 or fewer"
    with pytest.raises(SlotError, match="--slot 0"):
        plan_slots(0, cpus=[0, 1])


def test_defaults_use_this_process_cpus() -> None:
    cpus = available_cpus()
    slots = plan_slots(len(cpus))
    check_disjoint_cover(slots, cpus)


@pytest.mark.parametrize(("cpus", "text"), [
    ((0, 1, 2, 3, 8, 9), "0-3,8-9"), ((5,), "5"), ((0, 1), "0-1"), ((3, 1, 2, 7), "1-3,7"), ((0, 2, 3, 4, 6), "0,2-4,6"),
])
def test_compact_cpu_lists(cpus: tuple[int, ...], text: str) -> None:
    assert compact_cpu_list(cpus) == text
    assert CoreSlot(tuple(sorted(cpus)), 0).cpu_list == text


def test_pin_prefix_prefers_numactl(monkeypatch: pytest.MonkeyPatch) -> None:
    slot = CoreSlot((0, 1, 2, 3), 0)
    monkeypatch.setattr(slots_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert pin_prefix(slot) == ["numactl", "-C", "0-3"]
    monkeypatch.setattr(slots_module.shutil, "which", lambda name: "/usr/bin/taskset" if name == "taskset" else None)
    assert pin_prefix(slot) == ["taskset", "-c", "0-3"]
    monkeypatch.setattr(slots_module.shutil, "which", lambda name: None)
    with pytest.raises(SlotError, match="install util-linux"):
        pin_prefix(slot)
