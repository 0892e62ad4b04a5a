"""FedAvg controller for a fixed site list, with a final validation round."""

from __future__ import annotations

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.fedavg import FedAvg

__all__ = ["SiteListFedAvg"]


class SiteListFedAvg(FedAvg):
    """``FedAvg`` whose rounds target exactly the job's site list, then validates the final model.

    - FLARE's ``FedAvg`` samples ``num_clients`` of the connected clients at random; a federation with a
      fixed site list (the one-hot index of PCS, the head bank) sends each round to those sites. A
      connected client that is not in the list gets no task; a listed site that is not connected stops
      the run with an error.
    - After the last round every site gets a ``validate`` task with the final aggregate: sites of
      algorithms evaluated on the global model (FedAvg, FedProx) validate and keep it; personalized
      sites report their final validation Dice.
    - Algorithms that share nothing (Local) return empty results; they are counted, not dropped.

    Args:
        sites: the job's ordered site list.
        final_validation: send the final ``validate`` task.
        *args, **kwargs: as ``FedAvg``.
    """

    # exported even when equal to FedAvg's defaults (FLARE drops defaults from the job config otherwise)
    _always_serialize_args = ("sites", "num_clients", "num_rounds", "persistor_id")

    def __init__(self, *args, sites: list[str] | None = None, final_validation: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.sites = sites
        self.final_validation = final_validation
        self._final_model: FLModel | None = None

    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        connected = [c.name for c in self.engine.get_clients()]
        if not self.sites:
            return super().sample_clients(num_clients)
        strangers = sorted(set(connected) - set(self.sites))
        if strangers:
            self.warning(f"connected client(s) {strangers} are not in the job's site list and get no task")
        missing = [s for s in self.sites if s not in connected]
        if missing:
            self.panic(f"site(s) {missing} of the job's site list {self.sites} are not connected")
        return [s for s in self.sites if s in connected]

    def _aggregate_one_result(self, result: FLModel) -> bool:
        if not result.params and getattr(self.aggregator, "accepts_empty_results", False):
            self.aggregator.accept_model(result)
            self._received_count += 1
            return True
        return super()._aggregate_one_result(result)

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        model = super().update_model(model, aggr_result)
        self._final_model = model
        return model

    def run(self) -> None:
        super().run()
        if not self.final_validation or self._final_model is None or self.abort_signal.triggered:
            return
        targets = self.sample_clients(self.num_clients)
        self.info(f"final validation of the last model on {targets}")
        results = self.send_model_and_wait(task_name="validate", data=self._final_model, targets=targets)
        scores = {}
        for r in results:
            name = (r.meta or {}).get("client_name", "?")
            scores[name] = (r.metrics or {}).get("val_dice")
        self.info(f"final validation dice per site: {scores}")
        record = getattr(self.aggregator, "record_final_validation", None)
        if record is not None:
            record(scores)
