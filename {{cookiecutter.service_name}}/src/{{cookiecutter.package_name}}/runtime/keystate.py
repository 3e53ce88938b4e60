"""Per-key handler state (`ctx.state`): read before a batch is handled, kept after."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from .errors import DeadLetter
from .intake import WorkByKey
from .reaction import Reaction
from .retry import Outages
from .router import Router
from .state.base import KeyState, StateStore
from .state.encoding import decode_json, encode_json
from .streams import Streams

MAX_STATE_BYTES = 64 * 1024  # per key: state travels in every checkpoint that changes it


class KeySlot:
    """One key's handler state while a batch handles that key's events in order."""

    __slots__ = ("applied", "changed", "stored", "value")

    def __init__(self, stored: KeyState) -> None:
        self.stored = stored
        self.value = stored.value
        self.applied: list[str] = []  # ids of the events handled since `stored`
        self.changed = False

    def begin(self) -> dict[str, Any]:
        """A fresh copy for one attempt: a failed attempt leaves no trace."""
        return dict(decode_json(self.value)) if self.value is not None else {}

    def finish(self, event_id: str, state: dict[str, Any]) -> None:
        """Keep what a successful handler left in ctx.state; DeadLetter if unusable."""
        try:
            encoded = encode_json(state)
        except (TypeError, ValueError) as error:
            raise DeadLetter(
                "handler-failed", f"ctx.state must hold JSON values: {error}"
            ) from None
        if len(encoded) > MAX_STATE_BYTES:
            raise DeadLetter(
                "state-too-large",
                f"ctx.state is {len(encoded)} bytes encoded; the limit is {MAX_STATE_BYTES}",
            )
        value = None if encoded == b"{}" else encoded
        self.applied.append(event_id)
        if value != self.value:
            self.value, self.changed = value, True

    def to_store(self) -> KeyState:
        return KeyState(self.value, tuple(self.applied), self.stored.version)


SlotsByKey = dict[tuple[str, str], KeySlot]


class KeyStates:
    def __init__(
        self,
        router: Router,
        store: StateStore,
        outages: Outages,
        settle: Callable[[], Awaitable[None]],
    ) -> None:
        self.router = router
        self.store = store
        self.outages = outages
        self.settle = settle  # makes every handled batch durable: the store is then current

    async def load(self, work: WorkByKey, streams: Streams) -> SlotsByKey:
        """State of every key a stateful handler will see: one read per stream, and none
        for keys an exclusive stream's owner already holds. The read waits for batches
        before this one to be durable only if one of them changed a key it reads."""
        if not self.router.has_stateful():
            return {}
        slots: SlotsByKey = {}
        missing: dict[str, list[str]] = defaultdict(list)
        behind = False
        for group, items in work.items():
            for item in items:  # a loop, not any(): this runs for every key of a batch
                if item.spec.stateful:
                    break
            else:
                continue  # no handler of this key's events keeps state
            stream, key = group
            held = streams.get(stream)  # None: given up in a rebalance meanwhile
            cached = held.cached_state(key) if held is not None else None
            if cached is not None:
                slots[group] = KeySlot(cached)
            else:
                missing[stream].append(key)
                behind = behind or held is None or held.store_is_behind(key)
        if missing:
            if behind:
                await self.settle()  # the store first holds what batches before changed
            loaded = await asyncio.gather(
                *(
                    self.outages.until_done(
                        "state read", partial(self.store.load_states, stream, keys)
                    )
                    for stream, keys in missing.items()
                )
            )
            for stream, states in zip(list(missing), loaded, strict=True):
                for key, state in states.items():
                    slots[stream, key] = KeySlot(state)
                if (held := streams.get(stream)) is not None:
                    held.remember_states(states)
        return slots

    @staticmethod
    def keep(slots: SlotsByKey, reaction: Reaction) -> None:
        """The changed keys' new state goes into the reaction's checkpoint."""
        for (stream, key), slot in slots.items():
            if slot.changed:
                reaction.states[stream][key] = slot.to_store()
