"""FedAvg controller for a fixed site list: who trains, how many must answer, resume, final validation."""

from __future__ import annotations

from collections.abc import Callable

from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.fedavg import FedAvg

from .persistor import RESUME_ROUND

__all__ = ["SiteListFedAvg", "REFUSAL_HEADER"]

# a site that refuses the job (another bundle version, unreadable data) says why in this header of its reply
REFUSAL_HEADER = "lcfed_site_refusal"


class SiteListFedAvg(FedAvg):
    """``FedAvg`` whose rounds target exactly the job's site list.

    - FLARE's ``FedAvg`` samples ``num_clients`` of the connected clients at random; a federation with a
      fixed site list (the one-hot index of PCS, the head bank) sends each round to the listed sites that
      are connected. A connected client that is not in the list gets no task.
    - ``min_clients`` (default: all sites) is how many results a round needs. Below the number of sites a
      round closes ``wait_time_after_min_received`` seconds after that many results arrived, so a site
      that dropped out does not stop the federation; the aggregator keeps its last head in the bank
      (stale) unless the job drops stale heads. With fewer connected sites than ``min_clients`` the run
      fails with a message naming the missing sites.
    - When the persistor resumes a saved run, training continues after the saved round up to the
      job's ``num_rounds`` in total; a resume with nothing left to train fails instead of "completing".
    - After the last round every site gets a ``validate`` task with the final aggregate: sites of
      algorithms evaluated on the global model (FedAvg, FedProx) validate and keep it; personalized
      sites report their final validation Dice.
    - Algorithms that share nothing (Local) return empty results; they are counted, not dropped.

    Args:
        sites: the job's ordered site list.
        min_clients: results a round needs (0: every listed site).
        wait_time_after_min_received: seconds a round waits for the other sites once ``min_clients`` answered.
        round_timeout: seconds after which a round stops waiting (0: forever). A site that died without
            FLARE noticing would otherwise hold the round open; the aggregator then fails the run when
            fewer than ``min_clients`` results came in.
        final_validation: send the final ``validate`` task.
        *args, **kwargs: as ``FedAvg``.
    """

    # exported even when equal to FedAvg's defaults (FLARE drops defaults from the job config otherwise)
    _always_serialize_args = ("sites", "num_clients", "num_rounds", "persistor_id")

    def __init__(
        self,
        *args,
        sites: list[str] | None = None,
        min_clients: int = 0,
        wait_time_after_min_received: int = 10,
        round_timeout: int = 3600,
        final_validation: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.sites = sites
        self.min_clients = min_clients
        self.round_timeout = round_timeout
        self.wait_time_after_min_received = wait_time_after_min_received
        self.final_validation = final_validation
        self._final_model: FLModel | None = None

    def _required(self, n_targets: int) -> int:
        return min(self.min_clients, n_targets) if self.min_clients > 0 else n_targets

    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        connected = [c.name for c in self.engine.get_clients()]
        if not self.sites:
            return super().sample_clients(num_clients)
        strangers = sorted(set(connected) - set(self.sites))
        if strangers:
            self.warning(f"connected client(s) {strangers} are not in the job's site list and get no task")
        targets = [s for s in self.sites if s in connected]
        missing = [s for s in self.sites if s not in connected]
        needed = self._required(len(self.sites))
        if len(targets) < needed:
            self.panic(
                f"only {len(targets)} of the job's {len(self.sites)} sites are connected (missing {missing}); "
                f"each round needs {needed} (min_clients)"
            )
        elif missing:
            self.warning(f"site(s) {missing} are not connected; training with {targets}")
        return targets

    def send_model(
        self,
        task_name: str = "train",
        data: FLModel = None,
        targets: list[str] | None = None,
        min_responses: int = None,
        timeout: int = 0,
        callback: Callable[[FLModel], None] = None,
    ) -> None:
        n_targets = len(targets) if targets else len(self.sites or [])
        needed = self._required(n_targets)
        if min_responses is None and needed < n_targets:
            min_responses = needed
        timeout = timeout or self.round_timeout
        self.broadcast_model(
            task_name=task_name,
            data=data,
            targets=targets,
            min_responses=min_responses,
            timeout=timeout,
            wait_time_after_min_received=self.wait_time_after_min_received if min_responses else 0,
            blocking=False,
            callback=callback,
        )

    def load_model(self) -> FLModel:
        model = super().load_model()
        if model is None:
            return model
        resumed = (model.meta or {}).get(RESUME_ROUND)
        if resumed is not None:
            planned = self.num_rounds
            self.start_round = int(resumed) + 1
            self.num_rounds = planned - self.start_round
            if self.num_rounds <= 0:
                self.panic(
                    f"nothing to resume: the saved run already trained {self.start_round} of {planned} rounds "
                    "(export the job with more rounds to continue it)"
                )
                self.num_rounds = 0
            else:
                self.info(f"resuming after round {resumed}: rounds {self.start_round}..{planned - 1}")
        return model

    def _accept_train_result(
        self, client_name: str, result: Shareable, fl_ctx: FLContext, is_unknown_task: bool = False
    ) -> bool:
        refusal = result.get_header(REFUSAL_HEADER)
        if refusal:
            # a refusal is the site's decision, not a passing fault: the run stops with the site's own reason
            self.panic(f"site {client_name!r} refused the task: {refusal}")
            return False
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)

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
        needed = self._required(len(targets))
        self.info(f"final validation of the last model on {targets}")
        results = self.send_model_and_wait(
            task_name="validate",
            data=self._final_model,
            targets=targets,
            min_responses=needed if needed < len(targets) else None,
            timeout=self.round_timeout,
        )
        scores = {}
        for r in results:
            name = (r.meta or {}).get("client_name", "?")
            scores[name] = (r.metrics or {}).get("val_dice")
        self.info(f"final validation dice per site: {scores}")
        record = getattr(self.aggregator, "record_final_validation", None)
        if record is not None:
            record(scores)
