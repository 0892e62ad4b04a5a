"""The personal-key contract: which parameters are averaged, banked, or never leave a site.

One :class:`KeyContract` per algorithm, declared as name patterns over the model's ``state_dict``.
The learner (what it sends), the aggregator (what it averages, banks and accepts) and the tests all
use the same object; nothing else decides what leaves a hospital.

- shared: every key that is not personal. Sent every round and averaged by the server.
- personal: never averaged. Matches ``personal``.
- banked: the personal keys a site sends so that the server can hand every site the heads of all
  sites (LC-Fed's head bank). Matches ``banked`` (must be personal too). Never averaged.
- private: personal and not banked (e.g. LC-Fed's Head Calibration). Never leaves the site.

A site's message is either complete (every shared key plus its banked keys) or, in rounds where its
shared part cannot have changed (LC-Fed's staged HC rounds, network frozen), head-only: exactly its
banked keys. The server then keeps the global shared model (see :mod:`lcfed.runtime.aggregation`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["KeyContract", "ContractViolation", "BANK_PREFIX", "bank_key", "split_bank_key"]

BANK_PREFIX = "head_bank/"


class ContractViolation(ValueError):
    """A set of keys does not match what the contract allows."""


def bank_key(site: str, key: str) -> str:
    """Name under which the server sends ``site``'s banked ``key`` back to every site."""
    return f"{BANK_PREFIX}{site}/{key}"


def split_bank_key(name: str) -> tuple[str, str] | None:
    """Inverse of :func:`bank_key`; ``None`` for a key that is not a head-bank entry."""
    if not name.startswith(BANK_PREFIX):
        return None
    site, _, key = name[len(BANK_PREFIX) :].partition("/")
    if not site or not key:
        raise ContractViolation(f"malformed head-bank key {name!r}")
    return site, key


@dataclass(frozen=True)
class KeyContract:
    """Name patterns (regular expressions matched at the start of a key) of personal and banked keys.

    Args:
        personal: pattern of keys that are never averaged ("" = none: every key is shared).
        banked: pattern of personal keys that are sent for the head bank ("" = none).
        shares_nothing: the algorithm sends no parameters at all (Local training).
    """

    personal: str = ""
    banked: str = ""
    shares_nothing: bool = False

    def is_personal(self, key: str) -> bool:
        return self.shares_nothing or bool(self.personal and re.match(self.personal, key))

    def is_banked(self, key: str) -> bool:
        return not self.shares_nothing and bool(self.banked and re.match(self.banked, key)) and self.is_personal(key)

    def is_shared(self, key: str) -> bool:
        return not self.is_personal(key)

    def is_private(self, key: str) -> bool:
        return self.is_personal(key) and not self.is_banked(key)

    def shared_keys(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if self.is_shared(k)]

    def banked_keys(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if self.is_banked(k)]

    def outgoing_keys(self, keys: Iterable[str]) -> list[str]:
        """The keys a site sends: shared plus banked, in the given order."""
        return [k for k in keys if self.is_shared(k) or self.is_banked(k)]

    def is_head_only(self, sent: Iterable[str]) -> bool:
        """Whether a message carries no shared key (a head-only message, or nothing at all)."""
        return not any(self.is_shared(k) for k in sent)

    def check_outgoing(
        self,
        sent: Iterable[str],
        model_keys: Iterable[str],
        site: str = "?",
        allow_missing_shared: bool = False,
        head_only: bool | None = False,
    ) -> None:
        """Raise :class:`ContractViolation` unless ``sent`` is exactly the outgoing key set of the model.

        ``allow_missing_shared`` tolerates shared keys that a privacy filter (e.g. FLARE's ``ExcludeVars``)
        removed; banked keys must always be complete and nothing outside the outgoing set may appear.
        ``head_only``: ``False`` expects a complete message, ``True`` exactly the banked keys (a site in a
        round where its shared part is frozen), ``None`` either, decided by whether any shared key was sent
        (the server, which checks each message on its own).
        """
        sent = set(sent)
        model_keys = list(model_keys)
        if head_only is None:
            head_only = bool(self.banked) and self.is_head_only(sent)
        if head_only and not self.banked:
            raise ContractViolation(
                f"site {site!r}: a head-only message needs banked keys, but this contract banks none "
                f"(personal={self.personal!r})"
            )
        expected = set(self.banked_keys(model_keys) if head_only else self.outgoing_keys(model_keys))
        missing = sorted(expected - sent)
        if allow_missing_shared:
            missing = [k for k in missing if not self.is_shared(k)]
        extra = sorted(sent - expected)
        if missing or extra:
            known = set(model_keys)
            shared_extra = sorted(k for k in extra if k in known and self.is_shared(k))
            private = sorted(k for k in extra if k in known and not self.is_shared(k))
            parts = []
            if shared_extra:
                parts.append(f"shared keys in a round where the site sends only its head: {shared_extra[:5]}")
            if private:
                parts.append(f"keys that must never leave the site: {private[:5]}")
            unknown = sorted(set(extra) - known)
            if unknown:
                parts.append(f"unknown keys: {unknown[:5]}")
            if missing:
                parts.append(f"missing keys: {missing[:5]}")
            kind = "head-only " if head_only else ""
            raise ContractViolation(
                f"site {site!r} sent a {kind}key set that breaks the personal-key contract "
                f"(personal={self.personal!r}, banked={self.banked!r}): " + "; ".join(parts)
            )

    def select_outgoing(self, state: Mapping[str, object]) -> dict[str, object]:
        """The part of a state dict a site may send."""
        return {k: v for k, v in state.items() if self.is_shared(k) or self.is_banked(k)}
