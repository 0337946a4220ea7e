"""The node's garbage-collector settings once it is built."""

from __future__ import annotations

import gc

from medledger.node.appmain import GC_THRESHOLDS, settle_heap


def test_settle_heap_freezes_the_start_up_heap_and_raises_the_thresholds() -> None:
    before = gc.get_threshold()
    built = [{"start-up": i} for i in range(1000)]  # containers the collector tracks
    try:
        settle_heap()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0]
        assert gc.get_freeze_count() >= len(built)
        # Frozen objects are out of every collection's sight; objects made later are not.
        assert not any(obj is built[0] for obj in gc.get_objects())
        later = [["made later"]]
        assert gc.is_tracked(later) and any(obj is later for obj in gc.get_objects())
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
