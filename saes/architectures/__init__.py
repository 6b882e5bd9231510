"""The registry of SAE architectures: a name in cfg.json -> the SAE class that computes it.

One module per architecture (topk, batchtopk, matryoshka) holds its class, its options (the card
fields it owns), its keep rule, its extra loss terms and its SAELens layout; one line below
registers it. `build_sae(card)` rebuilds any SAE from its card alone.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from vitscope.saes.architectures.batchtopk import BatchTopKSAE
from vitscope.saes.architectures.matryoshka import MatryoshkaSAE
from vitscope.saes.architectures.topk import TopKSAE
from vitscope.saes.card import SAECard
from vitscope.saes.sae import SAE
from vitscope.support.errors import BadSetting

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """Names to values: `register` refuses a name twice, `get_or_raise` names the choices."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str, value: T) -> None:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = value

    def get_or_raise(self, name: str) -> T:
        """The value of `name`; BadSetting listing the known names when there is none."""
        if name not in self:
            raise BadSetting(f"unknown {self.kind} {name!r}; known: {', '.join(self)}")
        return self[name]


ARCHITECTURES: Registry[type[SAE]] = Registry("architecture")
for sae_class in (TopKSAE, BatchTopKSAE, MatryoshkaSAE):
    ARCHITECTURES.register(sae_class.Options.architecture, sae_class)

Architecture = Literal[tuple(ARCHITECTURES)]  # type: ignore[valid-type]
"""The registered names as a Literal, so configs and flags offer them as choices."""


def build_sae(card: SAECard, **init: Any) -> SAE:
    """A fresh SAE of the card's architecture and options; `init` are SAE's (seed, selection)."""
    return ARCHITECTURES.get_or_raise(card.architecture)(card, **init)
