"""What can stop a promotion besides bad input (``ValueError``): a lost race and a damaged champion."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from m3i.artifacts.errors import DamagedArtifactError

if TYPE_CHECKING:
    from m3i.promote.records import Event

__all__ = ["ChampionDamaged", "PromoteError", "PromotionConflict"]


class PromoteError(RuntimeError):
    """The model's promotion state does not allow the operation; nothing was moved."""


class PromotionConflict(PromoteError):
    """Another promotion, rejection or rollback of the same model recorded its event first.

    Attributes:
        seq: The log position both wanted.
        winner: The event that took it (``None`` when it could not be read back).
    """

    def __init__(self, name: str, seq: int, mine: str, winner: "Event | None") -> None:
        self.seq, self.winner = seq, winner
        if winner is not None:
            by = ", ".join(x for x in (f"run {winner.run.run_id}" if winner.run.run_id else "",
                                       f"KFP run {winner.run.kfp_run_id}" if winner.run.kfp_run_id else "") if x)
            who = f"the {winner.action} of {winner.candidate.version}" + (f" ({by})" if by else "") + f" at {winner.at}"
        else:
            who = "another writer"
        super().__init__(
            f"lost the race for event #{seq} of model {name!r}: {who} got there first; nothing was recorded for {mine} "
            "and the champion was not moved by this call; run it again to gate against the new state"
        )


class ChampionDamaged(PromoteError, DamagedArtifactError):
    """The champion pointer names a version that is deleted or damaged.

    Also a :class:`m3i.artifacts.DamagedArtifactError`: the one error of a damaged artifact, wherever it is read.

    Attributes:
        version: The champion's version.
        problem: What is wrong with it.
        rollback_to: Intact versions to roll back to, the previous champion first.
    """

    def __init__(self, name: str, version: str, problem: str, rollback_to: Sequence[str]) -> None:
        self.version, self.problem, self.rollback_to = version, problem, list(rollback_to)
        offer = (
            f"roll back to an intact version, e.g. rollback(models_uri, {name!r}, {self.rollback_to[0]!r}, reason) "
            f"(`m3i promote --to {self.rollback_to[0]}`); intact: {self.rollback_to}"
            if self.rollback_to else "no intact version is left to roll back to; export and promote a new one"
        )
        super().__init__(f"the champion of model {name!r}, {version}, is damaged: {problem}; nothing was moved. {offer}")
