"""Crash safety of the state map, explored by a hypothesis state machine.

Marks, clears, intent acquire/release, fence moves and commits are applied to a
real :class:`StateMap` over a :class:`FaultIO` and, in parallel, to a simple model.
A crash stops a commit before any one of its writes (a named crash point); the
disk then holds the last fsynced image plus any subset of the writes issued
since, each possibly torn at a sector boundary. The recovered map must:

* open (never "both slots corrupt"), with a superblock equal to the last
  committed one or the one being committed, never a mix;
* hold every out-of-sync bit that was set before the last completed commit and
  is still set, and every bit set since inside an extent that was durably hot
  (the invariant that lets the write path skip a metadata write per write);
* hold nothing that was never set, except whole hot extents ORed in by recovery
  and whole pages found damaged, which read as all ones (all out of sync, all
  hot); and only a page whose write was torn may be found damaged.
"""

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from statemap.faultio import FaultIO, SimulatedCrash
from statemap.format import AREA_INTENT, AREA_OUT_OF_SYNC, INTENT_SLOT, SECTOR, Fence
from statemap.states import CopyKind, DiskState
from statemap.statemap import StateMap

REGION = 512
REGIONS = 80_000  # three bitmap pages per member, so page boundaries are crossed
RPE = 1024  # regions per extent
SIZE = REGIONS * REGION
EXTENTS = (REGIONS + RPE - 1) // RPE
MEMBERS = ("b", "c")
DISKS = [DiskState.UPTODATE, DiskState.OUTDATED, DiskState.INCONSISTENT]


def ext_regions(e):
    return set(range(e * RPE, min(REGIONS, (e + 1) * RPE)))


class StateMapCrashMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.io = FaultIO()
        self.sm = StateMap.create_in(
            self.io, volume="v", size=SIZE, region_size=REGION, extent_size=RPE * REGION, member="a", peers=MEMBERS
        )
        self.sm.begin_use()
        self.sm.commit()
        # Model: current (in memory) and durable (at the last completed commit).
        self.cur = {m: set() for m in MEMBERS}
        self.dur = {m: set() for m in MEMBERS}
        self.cur_intent: set[int] = set()
        self.dur_intent: set[int] = set()
        self.in_flight: dict[int, int] = {}  # extent -> writes holding it
        self.seq = 0
        self.cur_sb = self._sb_view()
        self.dur_sb = self.cur_sb
        self.pending_need = 0

    def _sb_view(self):
        sb = self.sm.sb
        return (
            sb.disk,
            tuple((n, p.disk, p.copy.fence if p.copy else None) for n, p in sorted(sb.peers.items())),
            sb.clean,
        )

    # ------------------------------------------------------------------ rules

    @rule(member=st.sampled_from(MEMBERS), start=st.integers(0, REGIONS - 1), count=st.integers(1, 40_000))
    def mark(self, member, start, count):
        stop = min(REGIONS, start + count)
        self.sm.mark_regions_out_of_sync(member, range(start, stop))
        self.cur[member] |= set(range(start, stop))

    @rule(member=st.sampled_from(MEMBERS), start=st.integers(0, REGIONS - 1), count=st.integers(1, 40_000))
    def clear(self, member, start, count):
        stop = min(REGIONS, start + count)
        self.sm.clear_out_of_sync(member, range(start, stop))
        self.cur[member] -= set(range(start, stop))

    @rule(extent=st.integers(0, EXTENTS - 1))
    def acquire(self, extent):
        need = self.sm.intent_acquire(extent * RPE * REGION, REGION)
        self.pending_need = max(self.pending_need, need)
        self.in_flight[extent] = self.in_flight.get(extent, 0) + 1
        self.cur_intent = set(self.sm.hot_extents())

    @rule(extent=st.integers(0, EXTENTS - 1), count=st.integers(1, 3))
    def prefetch(self, extent, count):
        need = self.sm.intent_prefetch(range(extent, extent + count))
        self.pending_need = max(self.pending_need, need)
        self.cur_intent = set(self.sm.hot_extents())

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def release(self, data):
        extent = data.draw(st.sampled_from(sorted(self.in_flight)))
        self.seq += 1
        self.sm.intent_release(extent * RPE * REGION, REGION, self.seq)
        self.in_flight[extent] -= 1
        if not self.in_flight[extent]:
            del self.in_flight[extent]

    @rule()
    def flushed(self):
        self.sm.note_flushed(self.seq)
        self.sm.retire_idle()
        self.cur_intent = {e for e in range(EXTENTS) if self.sm.intent[e]}

    @rule(member=st.sampled_from(MEMBERS), fence=st.integers(0, SIZE), disk=st.sampled_from(DISKS))
    def superblock_change(self, member, fence, disk):
        if self.sm.sb.peers[member].copy is None:
            self.sm.set_peer_copy(member, Fence(CopyKind.FULL, 0))
        self.sm.advance_peer_fence(member, fence)
        self.sm.set_peer_disk(member, disk)
        self.cur_sb = self._sb_view()

    @rule()
    def commit(self):
        self.sm.commit()
        assert self.sm.durable_changes >= self.pending_need
        self.pending_need = 0
        self._now_durable()

    @precondition(lambda self: not self.in_flight)
    @rule()
    def clean_close_and_reopen(self):
        self.sm.note_flushed(self.seq)
        self.sm.prepare_clean_close()
        self.sm.commit()
        self.cur_intent = set()
        self._now_durable()
        sm = StateMap.load(FaultIO(image=self.io.durable_image()))
        assert sm.sb.clean and not sm.intent.any()
        assert sm.recover().needed is False
        # The next session starts; its first commit must clear the flag before
        # any bit it carries reaches the disk.
        self.sm.begin_use()
        self.cur_sb = self._sb_view()

    @rule(data=st.data())
    def crash(self, data):
        plan_writes = self.sm.prepare_commit()
        total = 0 if plan_writes is None else sum(len(p) for p in plan_writes.phases)
        if plan_writes is not None:
            self.sm.abort_commit(plan_writes)
        # Stop before write number k (k = total + 1: the commit completed, then died).
        k = data.draw(st.integers(1, total + 1), label="crash before write #")
        self.io.crash_at = ("", k)
        try:
            self.sm.commit()
            completed = True
        except SimulatedCrash:
            completed = False
        self.io.crash_at = None
        if completed:
            self._now_durable()
        n = len(self.io.pending)
        landed = data.draw(st.sets(st.integers(0, n - 1), max_size=n), label="landed") if n else set()
        torn = {}
        for i in sorted(landed):
            if data.draw(st.booleans(), label=f"torn {i}"):
                torn[i] = data.draw(st.integers(0, len(self.io.pending[i].data) // SECTOR - 1), label="sectors")
        image = self.io.crash_image(landed, torn)
        self._recover_from(image, {self.io.pending[i].offset for i in torn})

    # --------------------------------------------------------------- checking

    def _now_durable(self):
        self.dur = {m: set(s) for m, s in self.cur.items()}
        self.dur_intent = set(self.cur_intent)
        self.dur_sb = self._sb_view()

    def _recover_from(self, image, torn_offsets):
        io = FaultIO(image=image)
        sm = StateMap.load(io)  # must never refuse: one slot is always whole
        # A damaged page is one whose write tore, never one that was written whole.
        damaged = {m: set() for m in MEMBERS}
        damaged_hot = set()
        for bad in sm.bad_pages:
            if bad.area == "intent":
                assert sm.layout.page_offset(AREA_INTENT, INTENT_SLOT, bad.page) in torn_offsets, bad
                damaged_hot |= set(sm.layout.page_bits(AREA_INTENT, bad.page))
            else:
                assert sm.layout.page_offset(AREA_OUT_OF_SYNC, bad.slot, bad.page) in torn_offsets, bad
                damaged[bad.area.split(":")[1]] |= set(sm.layout.page_bits(AREA_OUT_OF_SYNC, bad.page))
        assert len(sm.warnings) >= len(sm.bad_pages)
        view = (
            sm.sb.disk,
            tuple((n, p.disk, p.copy.fence if p.copy else None) for n, p in sorted(sm.sb.peers.items())),
        )
        assert view in (self.dur_sb[:2], self.cur_sb[:2]), "superblock is neither old nor new"
        on_disk_hot = {e for e in range(EXTENTS) if sm.intent[e]}
        assert on_disk_hot <= self.dur_intent | self.cur_intent | damaged_hot
        rec = sm.recover()
        assert set(rec.hot_extents) == on_disk_hot
        sm.commit()
        ever_hot = self.dur_intent | self.cur_intent | damaged_hot
        hot_regions = set().union(*(ext_regions(e) for e in ever_hot)) if ever_hot else set()
        dur_hot_regions = set().union(*(ext_regions(e) for e in self.dur_intent)) if self.dur_intent else set()
        for m in MEMBERS:
            got = set(sm.out_of_sync_regions(m).search(1))
            must = self.cur[m] & (self.dur[m] | dur_hot_regions)
            lost = must - got
            assert not lost, f"member {m}: lost out-of-sync regions {sorted(lost)[:10]}"
            extra = got - (self.dur[m] | self.cur[m] | hot_regions | damaged[m])
            assert not extra, f"member {m}: invented regions {sorted(extra)[:10]}"
        # Carry on with the recovered map, as the restarted daemon would.
        self.io = io
        self.sm = sm
        self.sm.begin_use()
        self.sm.commit()
        self.cur = {m: set(sm.out_of_sync_regions(m).search(1)) for m in MEMBERS}
        self.cur_intent = set()
        self.in_flight = {}
        self.pending_need = 0
        self.cur_sb = self._sb_view()
        self._now_durable()

    @invariant()
    def memory_matches_model(self):
        for m in MEMBERS:
            assert self.sm.out_of_sync_regions(m).count(1) == len(self.cur[m])


StateMapCrashMachine.TestCase.settings = settings(
    # GMD_CRASH_EXAMPLES=5000 for a deep search; CI keeps the default quick.
    max_examples=int(os.environ.get("GMD_CRASH_EXAMPLES", "150")), stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestStateMapCrash = StateMapCrashMachine.TestCase
