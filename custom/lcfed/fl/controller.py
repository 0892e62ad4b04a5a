"""FedAvg controller that trains exactly the job's sites (never a random subset of whoever is connected)."""

from __future__ import annotations

from nvflare.app_common.workflows.fedavg import FedAvg

__all__ = ["SiteListFedAvg"]


class SiteListFedAvg(FedAvg):
    """``FedAvg`` whose rounds target the job's site list.

    FLARE's ``FedAvg`` samples ``num_clients`` of the connected clients at random; a federation with a
    fixed site list (the one-hot index of PCS, the head bank) must send each round to those sites.
    A connected client that is not in the list gets no task; a listed site that is not connected
    fails the round loudly.

    Args:
        sites: the job's ordered site list.
        *args, **kwargs: as ``FedAvg``.
    """

    def __init__(self, *args, sites: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sites = sites

    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        connected = [c.name for c in self.engine.get_clients()]
        if not self.sites:
            return super().sample_clients(num_clients)
        strangers = sorted(set(connected) - set(self.sites))
        if strangers:
            self.warning(f"connected client(s) {strangers} are not in the job's site list and get no task")
        targets = [s for s in self.sites if s in connected]
        missing = [s for s in self.sites if s not in connected]
        if missing:
            self.panic(f"site(s) {missing} of the job's site list {self.sites} are not connected")
            return targets
        return targets
